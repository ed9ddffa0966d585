"""`tide-ds bench teacher --placement P`: the CALM teacher call of `tide-ds bench teacher` on several
ranks, with the teacher placed as `engine.teacher_placement=P` places it in training.

The parent starts `--ranks` ranks with torchrun; every rank builds the same teacher, places it
(the same functions the engine uses), feeds its own micro-batch, and reports the teacher memory it
holds, the peak extra memory of the call (as `tide-ds bench teacher` measures it) and the call's
seconds (the second of two calls: the first pays one-off set-up such as gathering buffers).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

from tide_ds.bench.measure import resolve_device
from tide_ds.bench.teacher_call import bench_teacher, calm_call, cpu_peak


def run(args) -> int:
    if os.environ.get("TIDE_BENCH_RANK_WORKER"):
        rows = _worker(args)
        if rows is not None:  # rank 0 prints every rank's row on one line: ranks' prints would interleave
            print("BENCH " + json.dumps(rows), flush=True)
        # Everything is printed: skip interpreter teardown, where the process groups' threads can abort.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "torchrun"),
        "--nproc_per_node",
        str(args.ranks),
        "--master_port",
        str(port),
        "-m",
        "tide_ds.cli",
        "bench",
        "teacher",
    ]
    for key in (
        "batch",
        "length",
        "vocab",
        "hidden",
        "layers",
        "block_rows",
        "device",
        "placement",
        "tp_size",
        "ep_size",
    ):
        value = getattr(args, key)
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ, TIDE_BENCH_RANK_WORKER="1", MALLOC_MMAP_THRESHOLD_="1048576", OMP_NUM_THREADS="1")
    env.setdefault("DS_ACCELERATOR", "cpu" if resolve_device(args.device) == "cpu" else "cuda")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    printed = [line.split("BENCH ", 1)[1] for line in out.stdout.splitlines() if line.startswith("BENCH [")]
    rows = json.loads(printed[0]) if len(printed) == 1 else []
    if out.returncode != 0 or len(rows) != args.ranks:
        lines = out.stderr.splitlines()
        error = [line for line in lines if ": error: " in line][:1] or lines[-20:]
        print(f"{args.placement}: failed: " + "\n".join(error))
        return 1
    worst = {k: max(r[k] for r in rows) for k in ("held", "extra", "seconds")}
    print(
        f"placement {args.placement} (tp {args.tp_size}, ep {args.ep_size}) on {args.ranks} ranks, "
        f"b={args.batch} per rank, l={args.length}, V={args.vocab:,}, device {resolve_device(args.device)}"
    )
    print(f"{'teacher MiB/rank':>17} {'of whole':>9} {'peak extra MiB':>15} {'seconds':>8}  (worst rank)")
    print(
        f"{worst['held'] / 2**20:>17,.1f} {rows[0]['whole'] / 2**20:>9,.1f} {worst['extra'] / 2**20:>15,.1f} "
        f"{worst['seconds']:>8.2f}"
    )
    return 0


class _CalmStep:
    """What a placement needs of the distillation step, for the benchmark's one CALM teacher call."""

    def __init__(self, teacher, call):
        self.teacher, self._call = teacher, call

    def teacher_targets(self, _noised):
        return self._call(self.teacher)

    def with_teacher(self, teacher) -> _CalmStep:
        return _CalmStep(teacher, self._call)


def _worker(args) -> list[dict] | None:
    import deepspeed
    import torch

    from tide_ds.config import Config
    from tide_ds.engine import build, placement
    from tide_ds.engine.dist import Dist, local_size_for_autotp, unlink_shm_workspace

    on_cuda = resolve_device(args.device) == "cuda"
    if args.placement == "tensor_parallel":
        local_size_for_autotp()
    deepspeed.init_distributed("nccl" if on_cuda else "gloo", verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if on_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    else:
        unlink_shm_workspace(rank)
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    dist = Dist(rank, world, int(os.environ.get("LOCAL_RANK", rank)), device)
    teacher, ids, targets = bench_teacher(args, device, seed=100 + rank)
    whole = build.param_bytes(teacher)
    cfg = Config()
    cfg.engine.teacher_placement, cfg.engine.tp_size, cfg.engine.ep_size = args.placement, args.tp_size, args.ep_size
    placement.check_placement(cfg, teacher, dist)

    step = _CalmStep(teacher, lambda t: calm_call(t, ids, targets, args.block_rows))
    ds = None
    if args.placement == "zero3":
        ds = {
            "train_micro_batch_size_per_gpu": args.batch,
            "gradient_accumulation_steps": 1,
            "train_batch_size": args.batch * world,
            "bf16": {"enabled": False},
            "fp16": {"enabled": False},
            "steps_per_print": 10**9,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        }
    with tempfile.TemporaryDirectory() as tmp:
        if args.placement == "megatron":  # the placement reads its slices from a checkpoint
            path = [os.path.join(tmp, "teacher")]
            if rank == 0:
                teacher.model.save_pretrained(path[0])
            torch.distributed.broadcast_object_list(path, src=0)
            cfg.teacher.path = path[0]
        placed = placement.PLACEMENTS[args.placement](step, cfg, dist, ds)
        torch.distributed.barrier()  # every rank has read before rank 0 removes the files
    held = build.teacher_bytes(placed.module)

    def run_call():
        return placed.call(None)

    with torch.no_grad():
        run_call()  # warm-up: thread pools, lazy buffers
        torch.distributed.barrier()
        if on_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before, start = torch.cuda.memory_allocated(), time.perf_counter()
            run_call()
            torch.cuda.synchronize()
            extra, seconds = torch.cuda.max_memory_allocated() - before, time.perf_counter() - start
        else:
            extra, seconds = cpu_peak(run_call)
    rows = [None] * world
    torch.distributed.all_gather_object(
        rows, {"rank": rank, "held": held, "whole": whole, "extra": extra, "seconds": seconds}
    )
    return rows if rank == 0 else None
