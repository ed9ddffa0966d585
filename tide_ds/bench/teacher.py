"""`tide-ds bench teacher`: peak memory of a CALM teacher call against full fp32 logits.

The teacher is LLaDA2-style with the real vocabulary (157,184) and a tiny body, so the output
projection dominates as it does at scale. Every position is a target row (the worst case for
CALM, where only tokens of masked chunks are needed). Variants, each in a fresh process:

  forward  teacher.hidden_states only
  calm     hidden states, then per-token target log-probs projected in row chunks
  full     hidden states, then [b, l, V] fp32 logits and log_softmax (opt-in: --full; needs
           about 3x the full-logits size)

With --placement, the CALM call instead runs on --ranks ranks with the teacher placed as
`engine.teacher_placement` would place it (`tide_ds.bench.placement`).

"Peak extra" is the peak during the call minus the memory in use just before it (model and
inputs already built). On CPU it is the process's resident set size, sampled every 0.5 ms
from /proc/self/statm in a thread (and checked against getrusage's maximum); on CUDA it is
torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from tide_ds.bench.measure import resolve_device
from tide_ds.bench.teacher_call import bench_teacher, calm_call, cpu_peak

VARIANTS = ("forward", "calm", "full")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=157184)
    p.add_argument("--hidden", type=int, default=64, help="teacher hidden size (tiny, so a CPU runs it)")
    p.add_argument("--layers", type=int, default=2, help="layer 0 dense, the rest MoE")
    p.add_argument("--block-rows", type=int, default=None, help="rows projected at once (default: the kernel's choice)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--full", action="store_true", help="also run the full-logits variant (large)")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # worker mode
    p.add_argument(
        "--placement",
        choices=("replicate", "zero3", "expert_parallel", "tensor_parallel", "megatron"),
        help="run the CALM call on --ranks ranks with the teacher placed so",
    )
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--ep-size", type=int, default=1)


def run(args) -> int:
    if args.placement:
        from tide_ds.bench import placement

        return placement.run(args)
    if args.variant:
        print(json.dumps(measure(args)))
        return 0
    device = resolve_device(args.device)
    full_bytes = args.batch * args.length * args.vocab * 4
    print(
        f"CALM teacher call: b={args.batch} l={args.length} V={args.vocab:,}, LLaDA2-style teacher "
        f"(hidden {args.hidden}, {args.layers} layers), device {device}"
    )
    print(
        f"full fp32 logits b*l*V*4 = {full_bytes / 2**20:,.1f} MiB; budget (10%) = {full_bytes / 2**20 / 10:,.1f} MiB"
    )
    print(f"{'variant':<8} {'peak extra MiB':>15} {'% of full logits':>17} {'seconds':>8}")
    results = {}
    for variant in VARIANTS if args.full else VARIANTS[:2]:
        r = _worker(args, variant)
        results[variant] = r
        print(f"{variant:<8} {r['extra'] / 2**20:>15,.1f} {100 * r['extra'] / full_bytes:>16.2f}% {r['seconds']:>8.2f}")
    calm = results["calm"]["extra"] / full_bytes
    print(
        f"CALM call peak extra memory is {100 * calm:.2f}% of full fp32 logits "
        f"({'under' if calm < 0.1 else 'OVER'} the 10% budget); measured as {results['calm']['how']}"
    )
    return 0


def _worker(args, variant: str) -> dict:
    cmd = [sys.executable, "-m", "tide_ds.cli", "bench", "teacher", "--variant", variant]
    for key in ("batch", "length", "vocab", "hidden", "layers", "block_rows", "device"):
        value = getattr(args, key)
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    # glibc keeps freed blocks below a moving mmap threshold (up to 32 MiB) in its heap, so RSS
    # would include memory already freed; a fixed 1 MiB threshold returns large blocks at once.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark worker {variant} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(args) -> dict:
    import torch

    device = torch.device(resolve_device(args.device))
    teacher, ids, targets = bench_teacher(args, device)

    def call():
        with torch.no_grad():
            if args.variant == "calm":
                return calm_call(teacher, ids, targets, args.block_rows)
            hidden = teacher.hidden_states(ids)
            if args.variant == "full":
                logits = (hidden @ teacher.output_weight.T).float()
                return torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
            return hidden

    with torch.no_grad():  # warm-up on a short input: thread pools and lazy allocations
        teacher.hidden_states(ids[:1, :32])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        extra = torch.cuda.max_memory_allocated() - before
        how = "torch.cuda.max_memory_allocated"
    else:
        extra, seconds = cpu_peak(call)
        how = "resident set size sampled every 0.5 ms (/proc/self/statm), cross-checked with getrusage"
    return {"variant": args.variant, "extra": extra, "seconds": seconds, "how": how}
