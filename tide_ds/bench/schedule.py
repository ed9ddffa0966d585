"""`tide-ds bench schedule`: the step time of `sequential` and `overlap` on the same models and
data, each phase's time, and the overlap fraction.

Student and teacher are random Qwen3 decoders (the teacher run bidirectionally); their sizes are
options, so that the teacher's time and the student's can be set within 2x of each other, where
overlapping pays most. Both schedules run the loop's own pieces (per-rank micro-batches built
ahead, the scheduler, the student's step); times are per optimizer step, after warm-up steps.
"Student" is forward + backward + optimizer; the overlapped step is compared with
max(teacher, student) of the sequential run, the least it could take.
"""

from __future__ import annotations

import argparse
import time

from tide_ds.bench.measure import device_name, resolve_device

PHASES = ("data", "teacher", "student_fwd", "backward", "optimizer")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--recipe", default="tide_shared", help="a recipe name (default tide_shared: CompDemo, 2 teacher passes)"
    )
    p.add_argument("--batch", type=int, default=4, help="rows per micro-batch")
    p.add_argument("--accumulation", type=int, default=2)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=256, help="student and teacher hidden size")
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per schedule")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def _run(schedule_name: str, args, step, device) -> dict:
    import torch

    from tide_ds.data.sampler import Prefetch, RankBatches
    from tide_ds.engine import PlainEngine
    from tide_ds.engine.dist import Dist
    from tide_ds.engine.placement import PlacedTeacher
    from tide_ds.metrics import Phases, overlap_fraction
    from tide_ds.pipeline import build_scheduler
    from tide_ds.train import student_step

    rows = torch.randint(
        0, args.vocab - 1, (4 * args.batch * args.accumulation, args.length), generator=torch.Generator().manual_seed(0)
    )

    def collate(items):
        ids = torch.stack(items)
        return {"input_ids": ids, "maskable": torch.ones_like(ids, dtype=torch.bool)}

    opt = torch.optim.AdamW(step.student.parameters(), lr=1e-5)
    engine = PlainEngine(
        Dist(device=device),
        step.student,
        PlacedTeacher(step.teacher_targets, step.teacher),
        step.loss,
        optimizer=opt,
        scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
        accumulation=args.accumulation,
    )
    total = args.warmup + args.steps
    batches = RankBatches(
        list(rows),
        collate,
        step.noise,
        global_batch=args.batch * args.accumulation,
        micro_batch=args.batch,
        accumulation=args.accumulation,
        rank=0,
        seed=0,
    )
    data = Prefetch(batches.iterate(0, total), depth=2 * args.accumulation, pin=device.type == "cuda")
    phases = Phases(device)
    schedule = build_scheduler(schedule_name, engine.teacher_targets, device, phases)
    try:
        pairs = schedule(data)
        for i in range(total):
            if i == args.warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                phases.read()
                start = time.perf_counter()
            for _ in range(args.accumulation):
                noised, targets = next(pairs)
                student_step(engine, phases, noised, targets, progress=0.5)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    finally:
        schedule.close()
        data.close()
    times = phases.read()
    return {
        "step": wall / args.steps,
        **{k: v / args.steps for k, v in times.items()},
        "overlap": overlap_fraction(times, wall),
    }


def run(args) -> int:
    import torch

    from tide_ds.bench.step import _model
    from tide_ds.config import RECIPES
    from tide_ds.models import BD3LMStudent, HFBidirectionalTeacher
    from tide_ds.pipeline import DistillStep, resolve_terms

    if args.recipe not in RECIPES:
        raise SystemExit(f"unknown recipe {args.recipe!r}; choose one of {', '.join(RECIPES)}")
    device = torch.device(resolve_device(args.device))
    mask_id = args.vocab - 1
    student = BD3LMStudent(_model(args.hidden, args.vocab, args.student_layers, 0), args.block_size, mask_id).to(device)
    teacher = HFBidirectionalTeacher(_model(args.hidden, args.vocab, args.teacher_layers, 1).eval(), mask_id).to(device)
    step = DistillStep(student, teacher, resolve_terms(args.recipe))
    print(
        f"tide-ds bench schedule: recipe={args.recipe} micro-batch {args.batch} x {args.length} tokens, "
        f"accumulation {args.accumulation}, H={args.hidden} V={args.vocab}, student {args.student_layers} / teacher "
        f"{args.teacher_layers} layers, device={device_name(device.type)}"
    )
    print(f"milliseconds per optimizer step, mean of {args.steps} steps after {args.warmup} warm-up")
    rows = {name: _run(name, args, step, device) for name in ("sequential", "overlap")}
    print(f"{'schedule':<11} {'step':>8} " + " ".join(f"{p:>11}" for p in PHASES) + f" {'overlap':>8}")
    for name, r in rows.items():
        print(
            f"{name:<11} {1e3 * r['step']:>8.1f} "
            + " ".join(f"{1e3 * r[p]:>11.1f}" for p in PHASES)
            + f" {r['overlap']:>8.2f}"
        )
    seq = rows["sequential"]
    student_time = seq["student_fwd"] + seq["backward"] + seq["optimizer"]
    best = max(seq["teacher"], student_time)
    print(
        f"sequential: teacher {1e3 * seq['teacher']:.1f} ms, student {1e3 * student_time:.1f} ms per step "
        f"(ratio {seq['teacher'] / max(student_time, 1e-12):.2f}); overlap step / max(teacher, student) = "
        f"{rows['overlap']['step'] / max(best, 1e-12):.2f}, / sequential step = "
        f"{rows['overlap']['step'] / max(seq['step'], 1e-12):.2f}"
    )
    return 0
