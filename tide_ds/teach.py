"""`tide-ds teach`: run the teacher once over a whole distillation run and write its targets.

It builds what `tide-ds distill` with the same config builds before the student (data, run length,
terms; `tide_ds.train.build_run`), places the teacher as that run would (any placement, any number
of ranks), draws each rank's micro-batches with exactly the run's noise (`RankBatches`), calls the
one teacher call site (`DistillStep.teacher_targets`, CompDemo's passes merged there) and writes
the active chunks' log-probs in shards (`tide_ds.pipeline.targets`). `tide-ds distill
teacher.targets=DIR` then trains without a teacher.

Killed at any point, the same command continues: finished shards are kept (a shard exists only
once complete: written to a temporary name and renamed), the manifest is marked complete only
when every rank's shards are there.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

from tide_ds.config import Config, ConfigError, load_config, to_dict
from tide_ds.data.sampler import Prefetch, RankBatches
from tide_ds.engine import RunPlan, init_distributed, launched_world, load_ds_config, settle
from tide_ds.engine.build import place_teacher
from tide_ds.engine.dist import fail_fast
from tide_ds.engine.host import fix_mmap_threshold
from tide_ds.models.build import ensure_mask_token
from tide_ds.pipeline import resolve_terms
from tide_ds.pipeline import targets as stored
from tide_ds.train import (
    build_data,
    build_teacher_model,
    close_distributed,
    distill_step,
    run_length,
    student_tokenizer,
    targets_fingerprint,
)
from tide_ds.tree import to_device


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="the YAML config of the run the targets are for (as for `tide-ds distill`)")
    p.add_argument("--out", required=True, metavar="DIR", help="the targets directory (give it to teacher.targets)")
    p.add_argument(
        "--shard-steps", type=int, default=16, metavar="N", help="optimizer steps per shard file (default 16)"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.seed=1")


def run(args) -> int:
    if args.shard_steps < 1:
        raise ConfigError(f"--shard-steps must be >= 1, got {args.shard_steps}")
    teach(load_config(args.config, args.overrides), args.out, args.shard_steps)
    return close_distributed(0)


def teach(cfg: Config, out: str, shard_steps: int = 16) -> dict:
    if cfg.teacher.targets:
        raise ConfigError("teacher.targets is set: `tide-ds teach` writes targets (--out DIR); unset teacher.targets")
    fix_mmap_threshold()  # freed host tensors go back to the system (tide_ds/engine/host.py)
    ds_json = load_ds_config(cfg.engine.ds_config) if cfg.engine.ds_config else None
    plan, ds_config = settle(cfg, ds_json, launched_world())
    dist = init_distributed(plan.config, plan.deepspeed)
    return fail_fast(lambda: _teach(plan, ds_config, dist, Path(out), shard_steps))


def _teach(plan: RunPlan, ds_config: dict | None, dist, out: Path, shard_steps: int) -> dict:
    cfg = plan.config
    torch.manual_seed(cfg.train.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    log = print if dist.is_main else (lambda *a, **k: None)
    tokenizer = student_tokenizer(cfg)
    data = build_data(cfg, tokenizer)
    plan = dataclasses.replace(plan, config=run_length(cfg, data))
    cfg, t = plan.config, plan.config.train
    terms = resolve_terms(cfg.recipe, cfg.terms, "cross" if data.cross_tokenizer else "shared", cfg.objective)
    stored.check_storable(cfg, terms)
    layout = {
        "world": dist.world,
        "micro_batch_size": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "shard_steps": shard_steps,
        "engine.teacher_placement": cfg.engine.teacher_placement,
        "objective.kernels": cfg.objective.kernels,
    }
    start(out, targets_fingerprint(cfg, terms, data, tokenizer), layout, cfg, dist)

    # noise reads only the student's mask id: teach builds no student
    student = SimpleNamespace(mask_token_id=ensure_mask_token(tokenizer, cfg.diffusion.mask_token))
    teacher = build_teacher_model(cfg, terms, data, tokenizer, dist.device)
    step = distill_step(cfg, student, teacher, terms)
    call = place_teacher(plan, ds_config, step, dist).call
    accum, micro = t.gradient_accumulation_steps, t.micro_batch_size
    ranks = RankBatches(
        data.train,
        data.collate,
        step.noise,
        global_batch=t.global_batch_size,
        micro_batch=micro,
        accumulation=accum,
        rank=dist.rank,
        seed=t.seed,
    )
    mine = range(dist.rank * accum * micro, (dist.rank + 1) * accum * micro)
    writer = stored.TargetsWriter(out, shard_steps, t.steps, mine)
    todo = shards_to_do(writer, cfg.engine.teacher_placement, dist)
    log(
        f"tide-ds teach: {len(writer.starts()) - len(todo)} of {len(writer.starts())} shards there; "
        f"{t.steps} steps x global batch {t.global_batch_size}, {dist.world} rank(s)"
    )

    def steps_of(first: int) -> range:
        return range(first, min(first + shard_steps, t.steps))

    items = Prefetch(
        (ranks.build(s, j) for first in todo for s in steps_of(first) for j in range(accum)), depth=t.data_prefetch
    )
    began, computed, written = time.perf_counter(), 0, 0
    try:
        for first in tqdm(todo, desc="teach", dynamic_ncols=True, mininterval=1.0, disable=not dist.is_main):
            for _ in range(len(steps_of(first)) * accum):
                noised = to_device(next(items), dist.device)
                writer.add(noised, call(noised))
            computed += 1
            # a rank that had this shard computed it only for the teacher's collectives
            written += 0 if writer.done(first) else writer.close_shard(first)
            writer.reset()
    finally:
        items.close()
    seconds = time.perf_counter() - began
    if dist.world > 1:
        torch.distributed.barrier()
    summary = {"computed": computed, "bytes_written": written, "seconds": seconds, "world": dist.world}
    if dist.is_main:
        summary.update(complete(out, layout, t.steps, t.global_batch_size))
        log(
            f"tide-ds teach: {summary['shards']} shards, {summary['rows']} rows, {summary['bytes'] / 2**20:.2f} MiB "
            f"in {out} ({computed} shards computed here in {seconds:.1f} s)"
        )
    return summary


def start(out: Path, fingerprint: dict, layout: dict, cfg: Config, dist) -> None:
    """Rank 0 writes the manifest of a new directory, or checks that an existing one is for this
    run and layout (then the run continues it); leftovers of a killed write are removed."""
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for tmp in out.glob("*.tmp*"):
            tmp.unlink()
        manifest = stored.read_manifest(str(out))
        if manifest is None:
            stored.write_json(
                out / stored.MANIFEST,
                {
                    "format": stored.FORMAT,
                    "complete": False,
                    "fingerprint": fingerprint,
                    "layout": layout,
                    "config": to_dict(cfg),
                },
            )
        else:
            diff = stored.first_difference(manifest["fingerprint"], fingerprint)
            if diff is not None:
                raise ConfigError(f"--out {out} holds targets of another run ({diff}); give a new --out")
            diff = stored.first_difference(manifest["layout"], layout)
            if diff is not None:
                raise ConfigError(f"--out {out} was begun with another layout ({diff}); continue it with the same")
    if dist.world > 1:
        torch.distributed.barrier()


def shards_to_do(writer: stored.TargetsWriter, placement: str, dist) -> list[int]:
    """This rank's shards to compute. A replicated teacher has no collectives: each rank skips its
    own finished shards. A sharded one needs every rank in every call: all compute the shards any
    rank lacks (one rank decides: rank 0's view of the files, broadcast)."""
    # on the process group's device: NCCL reduces only CUDA tensors
    missing = torch.tensor([not writer.done(s) for s in writer.starts()], dtype=torch.int32, device=dist.device)
    if placement != "replicate" and dist.world > 1:
        torch.distributed.all_reduce(missing, op=torch.distributed.ReduceOp.MAX)
    return [s for s, m in zip(writer.starts(), missing.tolist()) if m]


def complete(out: Path, layout: dict, steps: int, global_batch: int) -> dict:
    """Marks the directory complete once every rank's every shard is there."""
    per_rank = global_batch // layout["world"]
    shards = []
    for rank in range(layout["world"]):
        positions = range(rank * per_rank, (rank + 1) * per_rank)
        for first in range(0, steps, layout["shard_steps"]):
            path = out / stored.shard_name(first, positions)
            if not path.is_file():
                raise RuntimeError(f"tide-ds teach: shard {path.name} is missing after every rank finished")
            shards.append(
                {"first_step": first, "positions": [positions.start, positions.stop], "bytes": path.stat().st_size}
            )
    manifest = stored.read_manifest(str(out))
    total = sum(s["bytes"] for s in shards)
    manifest.update(complete=True, shards=shards, rows=steps * global_batch, bytes=total)
    stored.write_json(out / stored.MANIFEST, manifest)
    return {"shards": len(shards), "rows": steps * global_batch, "bytes": total}
