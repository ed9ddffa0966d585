"""`tide-ds bench step`: time and peak memory of the student's loss, forward + backward, in one
distillation step, with the fused ops (`objective.kernels: auto`) and the plain reference.

Student and teacher are tiny random Qwen3 decoders with a real-sized vocabulary, so the output
projection dominates as it does at scale. The batch, its noise and the teacher's targets are made
before the timed call; what is timed is `DistillStep.loss` and its backward. Each variant runs in
a fresh process; peak memory is the growth during the first call (see `tide_ds.bench.measure`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from tide_ds.bench.measure import device_name, peak_growth, random_decoder, resolve_device, timed

VARIANTS = ("reference", "auto")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="tide_shared", help="a recipe name (default tide_shared)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256, help="student and teacher hidden size")
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--block-size", type=int, default=4)
    p.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="the student's decoder layers recompute their activations in backward (engine.activation_checkpointing)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per variant")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="objective.kernels values to run: " + ",".join(VARIANTS) + " (twin also accepted)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)


def _model(hidden: int, vocab: int, layers: int, seed: int):
    return random_decoder(hidden, layers, vocab, seed, ffn=2, tied=False)


def _worker(args) -> dict:
    import torch

    from tide_ds.models import BD3LMStudent, HFBidirectionalTeacher
    from tide_ds.pipeline import DistillStep, resolve_terms

    mask_id = args.vocab - 1
    student = BD3LMStudent(_model(args.hidden, args.vocab, args.layers, 0), args.block_size, mask_id).to(args.device)
    if args.activation_checkpointing:
        student.checkpoint_activations()
    teacher = HFBidirectionalTeacher(_model(args.hidden, args.vocab, args.layers, 1).eval(), mask_id).to(args.device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    step = DistillStep(student, teacher, resolve_terms(args.recipe), kernels=args.worker)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, args.vocab - 1, (args.batch, args.length), generator=g).to(args.device)
    batch = {"input_ids": x0, "maskable": torch.ones_like(x0, dtype=torch.bool)}
    noised = step.noise(batch, generator=g)
    targets = step.teacher_targets(noised)

    def call():
        student.zero_grad(set_to_none=True)
        loss, _ = step.loss(noised, targets, progress=0.5)
        loss.backward()

    peak = peak_growth(call, args.device)
    times = [timed(call, args.device) for _ in range(args.repeats)]
    return {
        "variant": args.worker,
        "time_s": statistics.median(times),
        "peak_bytes": peak,
        "masked_rows": int(noised.masked.sum()),
    }


def run(args) -> int:
    args.device = resolve_device(args.device)
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0
    from tide_ds.config import RECIPES

    if args.recipe not in RECIPES:
        raise SystemExit(f"unknown recipe {args.recipe!r}; choose one of {', '.join(RECIPES)}")
    variants = [v for v in args.variants.split(",") if v]
    print(
        f"tide-ds bench step: recipe={args.recipe} b={args.batch} l={args.length} H={args.hidden} "
        f"V={args.vocab} layers={args.layers} activation checkpointing "
        f"{'on' if args.activation_checkpointing else 'off'} device={device_name(args.device)}"
    )
    print(
        f"student loss forward+backward; time: median of {args.repeats} calls; peak memory: growth during the "
        "first call in a fresh process"
    )
    rows = {}
    for v in variants:
        cmd = [sys.executable, "-m", "tide_ds.cli", "bench", "step", "--worker", v]
        for key in ("recipe", "batch", "length", "hidden", "vocab", "layers", "block_size", "device", "repeats"):
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        cmd += ["--activation-checkpointing"] if args.activation_checkpointing else []
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"bench worker {v} failed:\n{out.stderr[-4000:]}")
        rows[v] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"masked rows: {next(iter(rows.values()))['masked_rows']}")
    print(f"{'kernels':<10} {'time (ms)':>11} {'peak (MiB)':>11}")
    for v, r in rows.items():
        print(f"{v:<10} {1e3 * r['time_s']:>11.1f} {r['peak_bytes'] / 2**20:>11.1f}")
    if "reference" in rows:
        for v, r in rows.items():
            if v != "reference":
                print(
                    f"{v} / reference: time {r['time_s'] / rows['reference']['time_s']:.3f}x, peak memory "
                    f"{r['peak_bytes'] / max(rows['reference']['peak_bytes'], 1):.3f}x"
                )
    return 0
