"""Checkpoints: atomic saves, resume from the newest complete one, rotation, export.

Layout under `<output_dir>/checkpoints/`:
  step<N>/                 DeepSpeed checkpoint (model, optimizer and scheduler states per rank) or,
                           for a plain single-process run, PLAIN_STATE (`plain_state.pt`)
  step<N>/tide_state.json  the marker, written last: step, ranks, the student's architecture and
                           every file's size (a truncated shard is found before it is read)
  step<N>.partial/         a save in progress, or one that was interrupted: never read, removed later
  hf/                      the student's transformers config and tokenizer (what `export` builds on)
  latest                   the newest complete tag (for DeepSpeed's tools; resume scans the directories)

A save writes everything into step<N>.partial, fsyncs it, writes the marker there and renames the
directory to step<N>; only then is `latest` replaced, by a rename. A kill at any point of a save
leaves every earlier checkpoint complete and `latest` naming one of them.

Data position and noise are pure functions of the step (see `tide_ds.data.sampler`), so the step is
what a resume needs besides the engine states; the torch RNG states are saved too.

`tide-ds export CKPT OUT` writes a model directory that `from_pretrained` loads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal

import torch

from tide_ds.config import Config, ConfigError
from tide_ds.engine.build import PLAIN_STATE

MARKER = "tide_state.json"
PARTIAL = ".partial"
KILL_AT = "TIDE_DS_KILL_AT"  # fault injection for tests: "<point>@<step>" kills the process there (SIGKILL)
_TAG = re.compile(r"step(\d+)$")


def root_of(cfg: Config) -> str:
    return os.path.join(cfg.output_dir, "checkpoints")


def _split(path: str) -> tuple[str, str]:
    """(checkpoint root, tag) for a tag directory, or a root holding `latest`."""
    path = path.rstrip("/")
    if os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest")) as f:
            return path, f.read().strip()
    return os.path.dirname(path), os.path.basename(path)


# -- which checkpoints are complete ------------------------------------------------------------


def why_incomplete(root: str, tag: str) -> str | None:
    """None for a complete checkpoint, else the reason it cannot be resumed."""
    path = os.path.join(root, tag)
    if not os.path.isdir(path):
        return "not found"
    try:
        with open(os.path.join(path, MARKER)) as f:
            marker = json.load(f)
    except FileNotFoundError:
        return f"incomplete (no {MARKER}: the save was interrupted)"
    except (OSError, ValueError) as e:
        return f"damaged (unreadable {MARKER}: {e})"
    for name, size in marker.get("files", {}).items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"damaged (file {name} is missing)"
        if os.path.getsize(file) != size:
            return f"damaged (file {name} has {os.path.getsize(file)} bytes, {size} when saved)"
    return None


def _steps(root: str) -> list[tuple[int, str]]:
    """(step, tag) of every step<N> directory, newest first."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(root) if (m := _TAG.match(name))]
    return sorted(found, reverse=True)


def newest_complete(root: str) -> tuple[str | None, list[str]]:
    """The complete step<N> with the highest N, and what was skipped on the way, and why."""
    skipped = (
        [
            f"{name} (an interrupted save)"
            for name in sorted(os.listdir(root))
            if _TAG.match(name[: -len(PARTIAL)]) and name.endswith(PARTIAL)
        ]
        if os.path.isdir(root)
        else []
    )
    for _, tag in _steps(root):
        reason = why_incomplete(root, tag)
        if reason is None:
            return tag, skipped
        skipped.append(f"{tag} ({reason})")
    return None, skipped


def resolve_resume(cfg: Config, log=print) -> tuple[str, str] | None:
    """The (root, tag) to resume from, checked complete; None when not resuming (or `auto` finds none)."""
    how = cfg.train.resume
    if how is None:
        return None
    if how in ("auto", "latest"):
        root = root_of(cfg)
        tag, skipped = newest_complete(root)
        for s in skipped:
            log(f"resume: skipping checkpoint {os.path.join(root, s)}")
        if tag is not None:
            log(f"resume: from {os.path.join(root, tag)} (the newest complete checkpoint)")
            return root, tag
        if how == "auto":
            log(f"resume: no complete checkpoint in {root}; starting fresh")
            return None
        raise ConfigError(
            f"train.resume=latest: no complete checkpoint in {root} "
            f"({'; '.join(skipped) or 'none saved'}); start without --resume, or use --resume auto"
        )
    if not os.path.isdir(how):
        raise ConfigError(
            f"train.resume: checkpoint {how} not found (give a directory under "
            f"{root_of(cfg)}, 'latest' or 'auto' with the run's output_dir)"
        )
    root, tag = _split(how)
    reason = why_incomplete(root, tag)
    if reason is not None:
        other, _ = newest_complete(root)
        hint = f"resume from {os.path.join(root, other)}" if other else f"no complete checkpoint in {root}"
        raise ConfigError(f"train.resume: checkpoint {os.path.join(root, tag)} is {reason}; {hint}")
    return root, tag


# -- saving ---------------------------------------------------------------------------------------


def _kill_point(point: str, step: int) -> None:
    if os.environ.get(KILL_AT) == f"{point}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    for folder, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(folder, name), "rb+") as f:
                os.fsync(f.fileno())
        _fsync_dir(folder)


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _remove(path: str) -> None:
    """A checkpoint loses its marker first: a deletion cut short leaves an incomplete one, never a broken one."""
    try:
        os.unlink(os.path.join(path, MARKER))
    except FileNotFoundError:
        pass
    shutil.rmtree(path, ignore_errors=True)


def architecture(student) -> str:
    """A short hash of the student's parameter names and full shapes (ZeRO-3 partitions included)."""
    h = hashlib.sha256()
    for name, p in student.named_parameters():
        h.update(f"{name}:{tuple(getattr(p, 'ds_shape', p.shape))};".encode())
    return h.hexdigest()[:16]


def _weights_finite(engine) -> bool:
    device = engine.dist.device  # where the collective runs (ZeRO may offload partitions to the CPU)
    local = [torch.isfinite(getattr(p, "ds_tensor", p).detach()).all().to(device) for p in engine.student.parameters()]
    ok = torch.stack(local).all().to(torch.int32)
    if engine.dist.world > 1:
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok)  # sync point: once per save


def _barrier(dist) -> None:
    if dist.world > 1:
        torch.distributed.barrier()


def save(engine, cfg: Config, step: int, tokenizer) -> str:
    """Saves a complete checkpoint of `step` on every rank; returns its directory."""
    root, tag = root_of(cfg), f"step{step}"
    final, partial = os.path.join(root, tag), os.path.join(root, tag + PARTIAL)
    dist = engine.dist
    if not _weights_finite(engine):
        raise ConfigError(
            f"the student's weights are not finite at step {step}; nothing was saved, the "
            f"checkpoints in {root} are unchanged (lower train.lr or set train.nonfinite=stop)"
        )
    state = {"step": step, "torch_rng": torch.get_rng_state()}
    try:
        if dist.is_main:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
        _barrier(dist)
        engine.save(root, tag + PARTIAL, state)
        _kill_point("states", step)
        _barrier(dist)
        if dist.is_main:
            _save_hf(root, engine, tokenizer)
            _fsync_tree(partial)
            files = {
                os.path.relpath(os.path.join(d, n), partial): os.path.getsize(os.path.join(d, n))
                for d, _, names in os.walk(partial)
                for n in names
            }
            marker = {
                "step": step,
                "world": dist.world,
                "deepspeed": engine.deepspeed,
                "architecture": architecture(engine.student),
                "files": files,
            }
            _write_atomic(os.path.join(partial, MARKER), json.dumps(marker, indent=1))
            _kill_point("marker", step)
            if os.path.isdir(final):  # the same step saved before (a run that stopped there): replace it
                _remove(final)
            os.rename(partial, final)
            _fsync_dir(root)
            _kill_point("rename", step)
            _write_atomic(os.path.join(root, "latest"), tag)
            _kill_point("latest", step)
            rotate(root, cfg.train.keep_last, keep=tag)
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not _is_write_error(e):
            raise
        shutil.rmtree(partial, ignore_errors=True)
        raise ConfigError(_save_failed(e, root, tag)) from None
    _barrier(dist)
    return final


def _save_hf(root: str, engine, tokenizer) -> None:
    hf = os.path.join(root, "hf")
    if os.path.isdir(hf):
        return
    shutil.rmtree(hf + PARTIAL, ignore_errors=True)
    engine.student.model.config.save_pretrained(hf + PARTIAL)
    tokenizer.save_pretrained(hf + PARTIAL)
    _fsync_tree(hf + PARTIAL)
    os.rename(hf + PARTIAL, hf)


def _is_write_error(e: RuntimeError) -> bool:
    """torch.save reports a full disk as a RuntimeError of its zip writer, without the errno."""
    text = str(e)
    return any(s in text for s in ("PytorchStreamWriter", "inline_container", "file write failed", "unexpected pos"))


def _save_failed(e: Exception, root: str, tag: str) -> str:
    try:
        usage = shutil.disk_usage(root)
        free, full = f"{usage.free / 2**20:.1f} MiB free", usage.free < max(64 * 2**20, 0.001 * usage.total)
    except OSError:
        free, full = "free space unknown", False
    if isinstance(e, OSError) and e.errno is not None:
        reason = os.strerror(e.errno)
    elif full:
        reason = "No space left on device"
    else:
        reason = str(e).strip().splitlines()[0]
    previous, _ = newest_complete(root)
    kept = (
        f"the previous checkpoint {os.path.join(root, previous)} is intact"
        if previous
        else "no earlier checkpoint exists"
    )
    return (
        f"saving checkpoint {tag} in {root} failed: {reason} ({free} there); {kept}; free space there, "
        f"lower train.keep_last, or set output_dir to a larger disk"
    )


def rotate(root: str, keep_last: int, keep: str) -> None:
    """Deletes interrupted saves and all but the `keep_last` newest complete checkpoints (never `keep`)."""
    for name in os.listdir(root):
        if name.endswith(PARTIAL):
            _remove(os.path.join(root, name))
    if keep_last <= 0:
        return
    others = [t for _, t in _steps(root) if t != keep and why_incomplete(root, t) is None]
    for tag in others[keep_last - 1 :]:
        _remove(os.path.join(root, tag))


# -- resuming -------------------------------------------------------------------------------------


def load(engine, root: str, tag: str) -> int:
    """Restores the engine states; returns the step to continue from."""
    where = os.path.join(root, tag)
    with open(os.path.join(where, MARKER)) as f:
        marker = json.load(f)
    if marker["deepspeed"] != engine.deepspeed:
        kind = "a DeepSpeed" if marker["deepspeed"] else "a single-process"
        raise ConfigError(
            f"train.resume: {where} is {kind} checkpoint; resume it the same way "
            f"(engine.ds_config / number of ranks as when it was saved)"
        )
    if marker.get("world", engine.dist.world) != engine.dist.world:
        raise ConfigError(
            f"train.resume: {where} was saved by {marker['world']} ranks, this run has "
            f"{engine.dist.world}; resume with {marker['world']} ranks, or export it (tide-ds export) "
            f"and start a new run from student.path"
        )
    if marker.get("architecture", architecture(engine.student)) != architecture(engine.student):
        raise ConfigError(
            f"train.resume: {where} holds another student architecture than this run builds; "
            f"set student.path / student.init as when it was saved"
        )
    try:
        state = engine.load(root, tag)
    except ConfigError:
        raise
    except Exception as e:  # a damaged file: name it, and where to resume instead
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ConfigError(
            f"train.resume: checkpoint {where} cannot be read ({type(e).__name__}: {first}); "
            f"it is damaged: resume from an earlier checkpoint in {root}, or delete it"
        ) from None
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])


def student_state_dict(root: str, tag: str) -> dict[str, torch.Tensor]:
    """The student's full fp32 weights (transformers names) from a plain or (ZeRO) DeepSpeed checkpoint."""
    plain = os.path.join(root, tag, PLAIN_STATE)
    if os.path.isfile(plain):
        sd, prefix = torch.load(plain, map_location="cpu", weights_only=False)["model"], "model."
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd, prefix = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag), "student.model."
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


# -- export ---------------------------------------------------------------------------------------


def export(checkpoint: str, out: str) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(checkpoint):
        raise ConfigError(f"checkpoint {checkpoint} not found")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"export: {out} is an existing file; give a directory path for the model")
    root, tag = _split(checkpoint)
    reason = why_incomplete(root, tag)
    if reason is not None:
        raise ConfigError(f"{os.path.join(root, tag)} is not a complete tide-ds checkpoint: {reason}")
    hf = os.path.join(root, "hf")
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(student_state_dict(root, tag), strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and model.config.tie_word_embeddings}
    if set(missing) - tied or unexpected:
        raise ConfigError(
            f"checkpoint {root}/{tag} does not match the saved config: missing "
            f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.tie_weights()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(hf).save_pretrained(out)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint",
        help="a checkpoint directory (<output_dir>/checkpoints/<tag>) or the "
        "checkpoints directory itself (its latest tag)",
    )
    p.add_argument("out", help="where to write the transformers model directory")


def run(args) -> int:
    print(f"exported {export(args.checkpoint, args.out)}")
    return 0
