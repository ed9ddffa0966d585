"""Checkpoints: save every N steps and at the end, resume exactly, export to a transformers directory.

Layout under `<output_dir>/checkpoints/`:
  <tag>/            DeepSpeed checkpoint (model, optimizer and scheduler states per rank) or, for a
                    plain single-process run, `plain_state.pt`
  <tag>/tide_state.json   written last, after every rank has saved: the checkpoint is complete
  hf/               the student's transformers config and tokenizer (what `export` builds on)
  latest            the newest tag

Data position and noise are pure functions of the step (see `tide_ds.data.sampler`), so the step is
what a resume needs besides the engine states; the torch RNG states are saved too.

`tide-ds export CKPT OUT` writes a model directory that `from_pretrained` loads.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from tide_ds.config import Config, ConfigError

MARKER = "tide_state.json"


def root_of(cfg: Config) -> str:
    return os.path.join(cfg.output_dir, "checkpoints")


def _split(path: str) -> tuple[str, str]:
    """(checkpoint root, tag) for a tag directory, or a root holding `latest`."""
    path = path.rstrip("/")
    if os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest")) as f:
            return path, f.read().strip()
    return os.path.dirname(path), os.path.basename(path)


def resolve_resume(cfg: Config) -> tuple[str, str] | None:
    """The (root, tag) to resume from, checked complete; None when not resuming."""
    if cfg.train.resume is None:
        return None
    where = root_of(cfg) if cfg.train.resume == "latest" else cfg.train.resume
    if not os.path.isdir(where):
        raise ConfigError(f"train.resume: checkpoint {where} not found (give a directory under "
                          f"{root_of(cfg)}, or 'latest' with the run's output_dir)")
    root, tag = _split(where)
    if not os.path.isfile(os.path.join(root, tag, MARKER)):
        raise ConfigError(f"train.resume: checkpoint {os.path.join(root, tag)} is incomplete (no {MARKER}: the "
                          f"save was interrupted); resume from an earlier checkpoint in {root}")
    return root, tag


def save(engine, cfg: Config, step: int, tokenizer) -> str:
    root, tag = root_of(cfg), f"step{step}"
    state = {"step": step, "torch_rng": torch.get_rng_state()}
    engine.save(root, tag, state)
    dist = engine.dist
    if dist.world > 1:
        torch.distributed.barrier()
    if dist.is_main:
        hf = os.path.join(root, "hf")
        if not os.path.isdir(hf):
            engine.student.model.config.save_pretrained(hf)
            tokenizer.save_pretrained(hf)
        with open(os.path.join(root, tag, MARKER), "w") as f:
            json.dump({"step": step, "world": dist.world, "deepspeed": engine.ds is not None}, f)
        with open(os.path.join(root, "latest"), "w") as f:
            f.write(tag)
    if dist.world > 1:
        torch.distributed.barrier()
    return os.path.join(root, tag)


def load(engine, root: str, tag: str) -> int:
    """Restores the engine states; returns the step to continue from."""
    with open(os.path.join(root, tag, MARKER)) as f:
        marker = json.load(f)
    if marker["deepspeed"] != (engine.ds is not None):
        kind = "a DeepSpeed" if marker["deepspeed"] else "a single-process"
        raise ConfigError(f"train.resume: {root}/{tag} is {kind} checkpoint; resume it the same way "
                          f"(engine.ds_config / number of ranks as when it was saved)")
    state = engine.load(root, tag)
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])


def student_state_dict(root: str, tag: str) -> dict[str, torch.Tensor]:
    """The student's full fp32 weights (transformers names) from a plain or (ZeRO) DeepSpeed checkpoint."""
    plain = os.path.join(root, tag, "plain_state.pt")
    if os.path.isfile(plain):
        sd, prefix = torch.load(plain, map_location="cpu", weights_only=False)["model"], "model."
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd, prefix = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag), "student.model."
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def export(checkpoint: str, out: str) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(checkpoint):
        raise ConfigError(f"checkpoint {checkpoint} not found")
    root, tag = _split(checkpoint)
    if not os.path.isfile(os.path.join(root, tag, MARKER)):
        raise ConfigError(f"{os.path.join(root, tag)} is not a complete tide-ds checkpoint (no {MARKER})")
    hf = os.path.join(root, "hf")
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(student_state_dict(root, tag), strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and model.config.tie_word_embeddings}
    if set(missing) - tied or unexpected:
        raise ConfigError(f"checkpoint {root}/{tag} does not match the saved config: missing "
                          f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.tie_weights()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(hf).save_pretrained(out)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint directory (<output_dir>/checkpoints/<tag>) or the "
                                      "checkpoints directory itself (its latest tag)")
    p.add_argument("out", help="where to write the transformers model directory")


def run(args) -> int:
    print(f"exported {export(args.checkpoint, args.out)}")
    return 0
