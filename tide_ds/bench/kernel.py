"""`tide-ds bench kernel`: time and peak memory of forward + backward for the bare output-projection
matmuls, the plain reference and the fused op, and their ratios.

Each variant runs in a fresh process. Peak memory is the growth over the inputs during the first
forward + backward (after a tiny warm-up): on GPU `torch.cuda.max_memory_allocated`, on CPU the
kernel's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) minus the
resident set before the call, so it counts every allocation torch makes, gradients included.
Time is the median over --repeats further calls.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

from tide_ds.bench.measure import device_name, peak_growth, resolve_device, timed
from tide_ds.outputs import check_out_file

VARIANTS = ("matmul", "reference", "fused")
OPS = ("calm", "kl", "logprobs")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
GPU_DEFAULTS = dict(n=4096, h=1024, v=151_936, dtype="bf16", repeats=10)
CPU_DEFAULTS = dict(n=1024, h=256, v=32_000, dtype="fp32", repeats=3)
# What the issue asks of the fused op, per device: the size it is stated at, and
# (time measured against, memory / reference at most, time ratio at most).
ACCEPTANCE = {
    "cpu": ("N=2048, H=256, V=151936", "reference", 0.15, 1.0),
    "cuda": ("N=4096, H=1024, V=151936", "matmul", 0.05, 1.3),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--op", choices=OPS, default="calm", help="fused_calm, fused_kl or target_logprobs")
    p.add_argument("--n", type=int, help="tokens (default 4096 on GPU, 1024 on CPU)")
    p.add_argument("--h", type=int, help="hidden size (default 1024 on GPU, 256 on CPU)")
    p.add_argument("--v", type=int, help="vocabulary (default 151936 on GPU, 32000 on CPU)")
    p.add_argument("--dtype", choices=DTYPES, help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--repeats", type=int, help="timed calls per variant (default 10 on GPU, 3 on CPU)")
    p.add_argument("--chunk-len", type=int, default=2, help="tokens per chunk (calm); every chunk is active")
    p.add_argument("--block-rows", type=int, help="token rows per block of the fused op (default: memory budget)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--csv", type=Path, help="also append the rows to this CSV file")
    p.add_argument("--worker", help=argparse.SUPPRESS)


def _fill_defaults(args) -> None:
    defaults = GPU_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


# ------------------------------------------------------------------ worker side


def _inputs(op, n, h, v, dtype, device, chunk_len, seed=0):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(device, dtype)  # noqa: E731
    x = dict(
        hidden=mk(n, h).requires_grad_(),
        weight=mk(v, h, scale=h**-0.5).requires_grad_(),
        targets=torch.randint(0, v, (n,), generator=g).to(device),
    )
    if op == "calm":
        b = max(1, n // 512) if n % max(1, n // 512) == 0 else 1
        ids = (torch.arange(n // b) // chunk_len).repeat(b, 1)
        num_chunks = int(ids.max()) + 1
        x.update(
            chunk_ids=ids.to(device),
            chunk_mask=torch.ones(b, num_chunks, dtype=torch.bool, device=device),
            teacher=(-4 * torch.rand(b, num_chunks, generator=g)).to(device),
        )
    if op == "kl":
        x.update(teacher_hidden=mk(n, h), teacher_weight=mk(v, h, scale=h**-0.5))
    return x


def _step(variant, op, x, block_rows):
    """A closure running one forward + backward of the variant."""
    import torch

    from tide_ds.kernels import fused_calm, fused_kl, target_logprobs

    h, w = x["hidden"], x["weight"]
    if variant == "matmul":  # the plain path's output-projection products, nothing else
        grad_z = torch.randn(h.shape[0], w.shape[0], device=h.device, dtype=h.dtype)

        def step():
            with torch.no_grad():
                h @ w.T
                if op == "kl":
                    x["teacher_hidden"] @ x["teacher_weight"].T
                grad_z @ w
                grad_z.T @ h

        return step
    impl = "reference" if variant == "reference" else "auto"

    def step():
        h.grad = w.grad = None
        if op == "calm":
            loss = fused_calm(
                h,
                w,
                x["targets"].view(x["chunk_ids"].shape),
                x["chunk_ids"],
                x["teacher"],
                x["chunk_mask"],
                impl=impl,
                block_rows=block_rows,
            )
        elif op == "kl":
            loss = fused_kl(h, w, x["teacher_hidden"], x["teacher_weight"], impl=impl, block_rows=block_rows)
        else:
            logp, lse = target_logprobs(h, w, x["targets"], impl=impl, block_rows=block_rows)
            loss = logp.sum() + 0.5 * lse.sum()
        loss.backward()

    return step


def _worker(args) -> int:
    import torch

    dtype = getattr(torch, DTYPES[args.dtype])
    small = _inputs(args.op, 64, 16, 1000, dtype, args.device, args.chunk_len, seed=1)
    _step(args.worker, args.op, small, args.block_rows)()  # warm-up: lazy initialisation, not the op
    x = _inputs(args.op, args.n, args.h, args.v, dtype, args.device, args.chunk_len)
    step = _step(args.worker, args.op, x, args.block_rows)
    peak = peak_growth(step, args.device)
    times = [timed(step, args.device) for _ in range(args.repeats)]
    print(json.dumps({"variant": args.worker, "time_s": statistics.median(times), "peak_bytes": peak}))
    return 0


# ------------------------------------------------------------------ driver side


def _run_variant(args, variant: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "tide_ds.cli",
        "bench",
        "kernel",
        "--worker",
        variant,
        "--op",
        args.op,
        "--n",
        str(args.n),
        "--h",
        str(args.h),
        "--v",
        str(args.v),
        "--dtype",
        args.dtype,
        "--device",
        args.device,
        "--repeats",
        str(args.repeats),
        "--chunk-len",
        str(args.chunk_len),
    ]
    if args.block_rows:
        cmd += ["--block-rows", str(args.block_rows)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"bench worker {variant} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args) -> int:
    if args.csv and not args.worker:
        check_out_file(str(args.csv), "--csv")
    args.device = resolve_device(args.device)
    _fill_defaults(args)
    if args.worker:
        return _worker(args)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    name = device_name(args.device)
    print(f"tide-ds bench kernel: op={args.op} N={args.n} H={args.h} V={args.v} dtype={args.dtype} device={name}")
    print(
        "peak memory: growth over the inputs during the first forward+backward in a fresh process "
        + ("(torch.cuda.max_memory_allocated)" if args.device == "cuda" else "(resident set high-water mark, VmHWM)")
        + f"; time: median of {args.repeats} calls"
    )
    rows = {v: _run_variant(args, v) for v in variants}
    print(f"{'variant':<10} {'time (ms)':>11} {'peak (MiB)':>11}")
    for v, r in rows.items():
        print(f"{v:<10} {1e3 * r['time_s']:>11.1f} {r['peak_bytes'] / 2**20:>11.1f}")
    ratio = lambda a, b, key: rows[a][key] / rows[b][key] if rows[b][key] > 0 else math.inf  # noqa: E731
    if "fused" in rows and "reference" in rows:
        print(
            f"fused / reference: time {ratio('fused', 'reference', 'time_s'):.3f}x, "
            f"peak memory {ratio('fused', 'reference', 'peak_bytes'):.3f}x"
        )
    if "fused" in rows and "matmul" in rows:
        print(f"fused / matmul:    time {ratio('fused', 'matmul', 'time_s'):.3f}x")
    size, against, mem_max, time_max = ACCEPTANCE[args.device]
    if {"fused", "reference", against} <= rows.keys():
        mem = ratio("fused", "reference", "peak_bytes")
        tim = ratio("fused", against, "time_s")
        ok = mem <= mem_max and tim <= time_max
        print(
            f"acceptance ({args.device}, stated at {size}): memory {mem:.3f}x <= {mem_max}x reference, "
            f"time {tim:.3f}x <= {time_max}x {against}: {'met' if ok else 'NOT met'}"
        )
    if args.csv:
        new = not args.csv.exists()
        with args.csv.open("a", newline="") as f:
            out = csv.writer(f)
            if new:
                out.writerow(["op", "variant", "n", "h", "v", "dtype", "device", "time_ms", "peak_mib"])
            for v, r in rows.items():
                out.writerow(
                    [
                        args.op,
                        v,
                        args.n,
                        args.h,
                        args.v,
                        args.dtype,
                        name,
                        f"{1e3 * r['time_s']:.2f}",
                        f"{r['peak_bytes'] / 2**20:.1f}",
                    ]
                )
    return 0
