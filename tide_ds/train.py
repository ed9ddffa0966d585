"""`tide-ds distill`: build the pieces from the config, run the loop, save the student.

The loop is short on purpose: noising, the teacher call and the loss live in
`tide_ds.pipeline.step`, data in `tide_ds.data`, models in `tide_ds.models`, DeepSpeed wiring in
`tide_ds.engine`, checkpoints in `tide_ds.checkpoint`.

Every rank reads the same global batch (a pure function of the step) and draws its noise from a
generator seeded by the step, then keeps its own micro-batches: rank r's micro-step j takes rows
[(r*G + j)*m, (r*G + j + 1)*m) for G accumulation steps of m rows. Any split of one global batch
over ranks and accumulation steps thus sees the same micro-batches, and a resumed run continues
with exactly the data and noise of an uninterrupted one.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import yaml
from tqdm import tqdm

from tide_ds import checkpoint
from tide_ds.config import (Config, ConfigError, epoch_steps, load_config, needs_teacher, resolved, run_terms,
                            to_dict)
from tide_ds.data.collate import Collator
from tide_ds.data.corpus import TextWindows, collate_windows, corpus_files, is_holdout
from tide_ds.data.prepare import REPORT_NAME, load_prepared
from tide_ds.engine import build_engine, init_distributed, slice_rows, wants_deepspeed
from tide_ds.engine.build import to_device
from tide_ds.engine.dist import fail_fast
from tide_ds.engine.merge import settled_global_batch
from tide_ds.eval import masked_token_loss
from tide_ds.models import build_student, build_teacher, load_tokenizer
from tide_ds.pipeline import DistillStep, RunTerms, resolve_terms


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config (see tide_ds/configs/ for examples)")
    p.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint directory, or 'latest' in output_dir")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config and print it fully resolved (YAML); load no model or data")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-4")


def run(args) -> int:
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    if args.dry_run:
        out, notes = resolved(load_config(args.config, overrides, check_files=False))
        print("\n".join(["# tide-ds distill --dry-run: the resolved config (no model or data loaded)"]
                        + [f"# {note}" for note in notes]))
        print(yaml.safe_dump(out, sort_keys=False), end="")
        return 0
    distill(load_config(args.config, overrides))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        multi = torch.distributed.get_world_size() > 1
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        if multi:  # everything is saved; skip interpreter teardown, where gloo's threads can abort
            if "mpi4py.MPI" in sys.modules and not sys.modules["mpi4py.MPI"].Is_finalized():
                sys.modules["mpi4py.MPI"].Finalize()  # mpirun counts an exit without it as a failure
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    return 0


def student_tokenizer(cfg: Config):
    path = cfg.student.tokenizer or cfg.student.path or cfg.teacher.tokenizer or cfg.teacher.path
    if path is None:
        raise ConfigError("no tokenizer: set student.tokenizer (or student.path / teacher.path)")
    key = "student.tokenizer" if cfg.student.tokenizer else "student.path" if cfg.student.path else "teacher.path"
    return load_tokenizer(path, key)


def check_shared_vocab(cfg: Config, tokenizer, recipe_name: str) -> None:
    """Without per-side token ids in the data the teacher reads the student's ids: they must agree."""
    path = cfg.teacher.tokenizer or cfg.teacher.path
    teacher_tok = load_tokenizer(path, "teacher.path")
    if teacher_tok.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"recipe '{recipe_name}' on this data needs one shared vocabulary, but the teacher's tokenizer "
            f"({path}, {len(teacher_tok)} ids) differs from the student's ({len(tokenizer)} ids); use a teacher "
            f"with the student's tokenizer, or prepare cross-tokenizer data with `tide-ds prepare` and recipe tide_cross")


@dataclass
class Data:
    train: Any
    held_out: Any
    collate: Callable[[list], dict]
    cross_tokenizer: bool  # rows carry teacher ids of another tokenizer (pipeline A)


def build_data(cfg: Config, tokenizer) -> Data:
    """A dataset prepared by `tide-ds prepare` (read as is, never re-tokenized), or the demo text
    corpus (tokenized here with the student's tokenizer, which the teacher then shares)."""
    source = cfg.data.source
    report_path = os.path.join(source, REPORT_NAME)
    if os.path.isfile(report_path):
        data = load_prepared(source)
        with open(report_path, encoding="utf-8") as f:
            report = json.load(f)
        check_prepared_tokenizer(report["config"]["student"]["tokenizer"], tokenizer, source)
        check_supervision(cfg, report["config"].get("supervise", "all_turns"))
        n_held = max(1, int(len(data) * cfg.data.holdout_fraction)) if len(data) > 1 else 0
        collate = Collator(report["student_eos_id"], cfg.diffusion.block_size, report["teacher_pad_id"],
                           eos_padding=cfg.data.eos_padding)
        held = data.select(range(n_held)) if n_held else data
        return Data(data.select(range(n_held, len(data))), held, collate,
                    cross_tokenizer=report["config"]["pipeline"] == "cross")
    files = corpus_files(source, cfg.data.max_files)
    held = [p for p in files if is_holdout(p, cfg.data.holdout_fraction)] or files[-1:]
    train = [p for p in files if p not in held] or files
    return Data(TextWindows(train, tokenizer, cfg.data.seq_len), TextWindows(held, tokenizer, cfg.data.seq_len),
                collate_windows, cross_tokenizer=False)


def check_supervision(cfg: Config, prepared: str) -> None:
    """The supervision scope is fixed when the data is prepared; the run may state the one it expects."""
    if cfg.data.supervise not in ("as_prepared", prepared):
        raise ConfigError(f"data.supervise={cfg.data.supervise} but data.source={cfg.data.source} was prepared with "
                          f"supervise={prepared}; prepare it again with supervise: {cfg.data.supervise}, or set "
                          f"data.supervise=as_prepared")


def check_prepared_tokenizer(prepared_with: str, tokenizer, source: str) -> None:
    """The student must read the ids the data was prepared with."""
    if os.path.isdir(prepared_with) and load_tokenizer(prepared_with, "data.source").get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"data.source={source} was prepared with the student tokenizer {prepared_with}, which differs "
                          f"from the student's tokenizer here; set student.tokenizer to it or prepare the data again")


def check_teacher_fits(cfg: Config, terms: RunTerms, data: Data, tokenizer) -> None:
    """Shared-vocabulary terms need one vocabulary; without its own ids the teacher reads the student's."""
    shared_only = [term.name for term in terms.terms if term.shared_vocab_only]
    if data.cross_tokenizer and shared_only:
        raise ConfigError(f"recipe '{cfg.recipe}' uses {', '.join(shared_only)}, which needs one shared vocabulary, but "
                          f"data.source={cfg.data.source} was prepared for two tokenizers; use tide_cross, calm or "
                          f"tide_shared, or prepare the data with pipeline=shared")
    if not data.cross_tokenizer:
        check_shared_vocab(cfg, tokenizer, cfg.recipe)


def global_batch(data: Data, size: int, seed: int, step: int) -> dict:
    """The global batch of optimizer step `step`: one shuffled pass per epoch, seeded by the epoch."""
    dataset = data.train
    per_epoch = len(dataset) // size
    if per_epoch == 0:
        raise ConfigError(f"the global batch ({size}) is larger than the training set ({len(dataset)} rows); "
                          f"lower train.micro_batch_size or train.gradient_accumulation_steps, or add data")
    epoch, j = divmod(step, per_epoch)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + 7919 * epoch))
    return data.collate([dataset[int(k)] for k in order[j * size:(j + 1) * size]])


def distill(cfg: Config) -> dict:
    dist = init_distributed(cfg)
    return fail_fast(lambda: _distill(cfg, dist))


def _distill(cfg: Config, dist) -> dict:
    t = cfg.train
    torch.manual_seed(t.seed)
    if t.threads:
        torch.set_num_threads(t.threads)
    device = dist.device
    wants_teacher = needs_teacher(run_terms(cfg.recipe, cfg.terms, cfg.objective))
    resume = checkpoint.resolve_resume(cfg)  # a missing or incomplete checkpoint stops here
    tokenizer = student_tokenizer(cfg)
    data = build_data(cfg, tokenizer)
    terms = resolve_terms(cfg.recipe, cfg.terms, "cross" if data.cross_tokenizer else "shared", cfg.objective)
    teacher = None
    if wants_teacher:
        check_teacher_fits(cfg, terms, data, tokenizer)
        teacher = build_teacher(cfg.teacher, cfg.diffusion.mask_token, block_size=cfg.diffusion.block_size).to(device)
    student = build_student(cfg.student, tokenizer, cfg.diffusion.block_size, cfg.diffusion.mask_token).to(device)
    eval_batches = list(itertools.islice(torch.utils.data.DataLoader(
        data.held_out, batch_size=t.micro_batch_size, collate_fn=data.collate), t.eval_batches))

    step = DistillStep(student, teacher, terms, kernels=cfg.objective.kernels, eps=cfg.diffusion.eps,
                       shared_vocab_size=cfg.objective.shared_vocab_size)
    if t.epochs:  # the length in steps, known once the data and the global batch are
        t.steps = epoch_steps(t.epochs, len(data.train), settled_global_batch(cfg, dist.world, wants_deepspeed(cfg)))
    engine = build_engine(cfg, step, dist, use_deepspeed=wants_deepspeed(cfg))  # settles the batch sizes
    accum, micro = t.gradient_accumulation_steps, t.micro_batch_size
    first = 0
    if resume is not None:
        first = checkpoint.load(engine, *resume)

    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in student.parameters())
    log = print if dist.is_main else (lambda *a, **k: None)
    log(f"recipe {cfg.recipe}: {' + '.join(f'{term.weight:g}*{term.name}' for term in terms.terms)}"
        f"{' (CompDemo)' if terms.comp_demo else ''}; student {n_params / 1e6:.2f}M params; "
        f"{len(data.train)} train / {len(data.held_out)} held-out rows; device {device}; "
        f"{dist.world} rank(s) x {accum} accumulation x {micro} = global batch {t.global_batch_size}")
    before = masked_token_loss(student, eval_batches, eps=cfg.diffusion.eps)
    log(f"held-out masked-token loss before: {before:.4f}")

    bar = tqdm(range(first, t.steps), desc="distill", dynamic_ncols=True, mininterval=1.0, disable=not dist.is_main)
    start = time.time()
    history = []
    for i in bar:
        batch = global_batch(data, t.global_batch_size, t.seed, i)
        noised_all = step.noise(batch, generator=torch.Generator().manual_seed(t.seed * 1_000_003 + i))
        sums: dict[str, torch.Tensor] = {}
        for j in range(accum):
            k = dist.rank * accum + j
            noised = to_device(slice_rows(noised_all, slice(k * micro, (k + 1) * micro)), device)
            targets = engine.teacher_targets(noised)
            loss, terms = engine.loss(noised, targets, progress=i / t.steps)
            engine.backward_step(loss)
            for name, v in {**terms, "loss": loss.detach()}.items():
                sums[name] = sums.get(name, 0) + v.float() / accum
        if i % t.log_every == 0 or i == t.steps - 1:
            stacked = torch.stack(list(sums.values()))
            if dist.world > 1:
                torch.distributed.all_reduce(stacked)
                stacked /= dist.world
            values = dict(zip(sums, stacked.tolist()))  # sync point: logging only
            history.append({"step": i, **values})
            bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()}, refresh=False)
        if t.save_every and (i + 1) % t.save_every == 0 and i + 1 < t.steps:
            checkpoint.save(engine, cfg, i + 1, tokenizer)
    elapsed = time.time() - start
    if first < t.steps:
        checkpoint.save(engine, cfg, t.steps, tokenizer)

    after = masked_token_loss(student, eval_batches, eps=cfg.diffusion.eps)
    log(f"held-out masked-token loss after:  {after:.4f} (before {before:.4f}; {t.steps - first} steps in {elapsed:.0f} s)")
    out = os.path.join(cfg.output_dir, "final")
    with engine.gathered():
        if dist.is_main:
            student.model.save_pretrained(out)
            tokenizer.save_pretrained(out)
    result = {"heldout_loss_before": before, "heldout_loss_after": after, "steps": t.steps, "seconds": elapsed,
              "history": history, "student_dir": out, "first_step": first, "world": dist.world}
    if dist.is_main:
        with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
        with open(os.path.join(cfg.output_dir, "metrics.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(f"saved student to {out}")
    return result
