"""`tide-ds bench floor`: a whole distillation step against what its models alone cost.

For each recipe, in one fresh process:
- memory floor: peak resident memory over building the student (and the teacher, when the recipe
  has one), the run's optimizer, and one optimizer step of a trivial loss (every gradient and
  AdamW state exists, no activations);
- matmul floor: the time of the step's essential products on random tensors of the step's shapes:
  the student's layers over [x_t ; x_0] forward and backward (linear layers as matrix products,
  attention as the fused scaled-dot-product kernel the models call), its output projection of the
  masked rows forward and backward in the fused head's row blocks, the teacher's layers forward
  (once per pass: CompDemo makes two) and its output projection of the rows the loss reads;
- the real step: noise, the teacher call, the student's loss, backward and optimizer step through
  the run's own engine (`settle` + `build_engine`, one process), its peak resident memory and time.
Floor and real step alternate `--repeats` times in the process; min and median are printed.
`--heap default` leaves glibc's mmap threshold to adjust itself, as it did before tide-ds distill
fixed it (tide_ds/engine/host.py): the difference is host memory the allocator kept.

Models are random Qwen3 decoders with tied embeddings (default: a 42.3M-parameter student, 4 layers
of hidden 256, and a 66.0M-parameter teacher, 4 layers of hidden 384, both with V=151,936).
`tide_cross` reads synthetic two-tokenizer rows (chunks of 1-2 tokens on each side, the teacher
with its own ids); `ce` builds no teacher. CPU only: resident memory is read from /proc.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from tide_ds.bench.measure import device_name, peak_resident, random_decoder, resident

RECIPES = ("ce", "tide_cross", "tide_shared")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipe names")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hidden", type=int, default=256, help="student hidden size")
    p.add_argument("--layers", type=int, default=4, help="student layers")
    p.add_argument("--teacher-hidden", type=int, default=384)
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--kernels", default="auto", help="objective.kernels (auto, twin, reference)")
    p.add_argument("--repeats", type=int, default=3, help="alternating floor / real step pairs")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument(
        "--heap",
        choices=("fixed", "default"),
        default="fixed",
        help="fixed: a fixed glibc mmap threshold, as tide-ds distill runs (tide_ds/engine/host.py); default: glibc's",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)


def seconds(call) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def _model(hidden: int, layers: int, vocab: int, seed: int):
    return random_decoder(hidden, layers, vocab, seed, ffn=3, tied=True)


def cross_batch(batch: int, length: int, vocab: int, generator):
    """Rows of two tokenizers: both sides cut into the same chunks, each 1-2 tokens long on either
    side (the teacher with its own ids), at most `length` tokens per side."""
    import torch

    rows = []
    for _ in range(batch):
        s_ids, t_ids, chunk = [], [], 0
        while True:
            ns, nt = (int(x) for x in torch.randint(1, 3, (2,), generator=generator))
            if len(s_ids) + ns > length or len(t_ids) + nt > length:
                break
            s_ids += [chunk] * ns
            t_ids += [chunk] * nt
            chunk += 1
        rows.append((s_ids + [-1] * (length - len(s_ids)), t_ids + [-1] * (length - len(t_ids)), chunk))
    chunk_ids = torch.tensor([r[0] for r in rows])
    teacher_chunk_ids = torch.tensor([r[1] for r in rows])
    return {
        "input_ids": torch.randint(0, vocab - 1, (batch, length), generator=generator),
        "maskable": chunk_ids >= 0,
        "chunk_ids": chunk_ids,
        "teacher_input_ids": torch.randint(0, vocab - 1, (batch, length), generator=generator),
        "teacher_chunk_ids": teacher_chunk_ids,
        "teacher_attention_mask": torch.ones(batch, length, dtype=torch.bool),
        "num_chunks": max(r[2] for r in rows),
    }


def _linear_products(tokens: int, shapes: list[tuple[int, int]], grad: bool):
    """The products of linear layers [out, in] over `tokens` rows: forward, and with `grad` the
    input and weight gradients (two more products each), on random operands made here."""
    import torch

    ops = []
    for out_f, in_f in shapes:
        x, w, g = torch.randn(tokens, in_f), torch.randn(out_f, in_f), torch.randn(tokens, out_f)
        ops.append((x, w, g))

    def call():
        for x, w, g in ops:
            x @ w.T
            if grad:
                g @ w
                g.T @ x

    return call


def _attention(batch: int, heads: int, seq: int, head_dim: int, grad: bool):
    """Scaled dot-product attention over `seq` positions (the fused kernel the models use), forward
    and with `grad` its backward."""
    import torch
    import torch.nn.functional as F

    q, k, v = (torch.randn(batch, heads, seq, head_dim, requires_grad=grad) for _ in range(3))
    g = torch.randn(batch, heads, seq, head_dim)

    def call():
        with torch.set_grad_enabled(grad):
            out = F.scaled_dot_product_attention(q, k, v)
            if grad:
                torch.autograd.grad(out, (q, k, v), g)

    return call


def _decoder_layers(batch: int, seq: int, hidden: int, layers: int, grad: bool):
    """`layers` Qwen3-style decoder layers (q, k, v, o; gate, up, down at 3 x hidden; attention) of
    `batch` x `seq` tokens."""
    heads = max(1, hidden // 64)
    linear = [(hidden, hidden)] * 4 + [(3 * hidden, hidden)] * 2 + [(hidden, 3 * hidden)]
    calls = [_linear_products(batch * seq, linear, grad), _attention(batch, heads, seq, hidden // heads, grad)]

    def call():
        for _ in range(layers):
            for c in calls:
                c()

    return call


def _head_products(rows: int, hidden: int, vocab: int, grad: bool):
    """The output projection of `rows` hidden rows over the vocabulary, in the fused head's row
    blocks (tide_ds.kernels.ops.block_rows): each block's logits, and with `grad` the block's input
    gradient and its share of the weight gradient. No [rows, V] tensor exists, as in the kernel."""
    import torch

    from tide_ds.kernels.ops import block_rows

    r = min(rows, block_rows(vocab))
    h, w = torch.randn(rows, hidden), torch.randn(vocab, hidden)
    g, dw = torch.randn(r, vocab), torch.zeros(vocab, hidden)

    def call():
        for start in range(0, rows, r):
            blk = h[start : start + r]
            blk @ w.T
            if grad:
                gb = g[: blk.shape[0]]
                gb @ w
                dw.addmm_(gb.T, blk)

    return call


def matmul_floor(recipe: str, shapes: dict):
    """A call running the step's essential products on random tensors of the step's shapes: the
    student's layers over [x_t ; x_0] forward and backward, its head at the masked rows forward and
    backward, the teacher's layers forward once per pass and its head at the rows the loss reads."""
    b, length, vocab = shapes["batch"], shapes["length"], shapes["vocab"]
    h, ht = shapes["hidden"], shapes["teacher_hidden"]
    calls = [
        _decoder_layers(b, 2 * length, h, shapes["layers"], grad=True),
        _head_products(shapes["rows"], h, vocab, grad=True),
    ]
    if shapes["teacher_rows"]:
        teacher = _decoder_layers(b, length, ht, shapes["teacher_layers"], grad=False)
        calls += [teacher] * shapes["passes"]
        calls.append(_head_products(shapes["teacher_rows"], ht, vocab, grad=False))

    def call():
        import torch

        with torch.no_grad():
            for c in calls:
                c()

    return call


@dataclasses.dataclass
class Bench:
    """One recipe's models in the run's engine: the trivial step of the memory floor, the real step,
    and (after a real step) the shapes the matmul floor takes."""

    student: object
    teacher: object
    trivial_step: Callable[[], None]
    real_step: Callable[[], None]
    shapes: dict


def build_bench(args) -> Bench:
    import torch

    from tide_ds.config import Config, needs_teacher, run_terms
    from tide_ds.engine import settle
    from tide_ds.engine.build import build_engine
    from tide_ds.engine.dist import Dist
    from tide_ds.metrics import Phases
    from tide_ds.models import BD3LMStudent, HFBidirectionalTeacher
    from tide_ds.pipeline import DistillStep, resolve_terms
    from tide_ds.train import student_step

    recipe, mask_id = args.worker, args.vocab - 1
    cross = recipe == "tide_cross"
    cfg = Config(recipe=recipe)
    cfg.objective.kernels = args.kernels
    terms = resolve_terms(recipe, None, "cross" if cross else "shared", cfg.objective)
    student = BD3LMStudent(_model(args.hidden, args.layers, args.vocab, 0), args.block_size, mask_id)
    teacher = None
    if needs_teacher(run_terms(recipe, None, cfg.objective)):
        teacher = HFBidirectionalTeacher(_model(args.teacher_hidden, args.teacher_layers, args.vocab, 1), mask_id)
    step = DistillStep(student, teacher, terms, kernels=args.kernels, eps=cfg.diffusion.eps)
    plan, ds_config = settle(cfg, None, 1)  # one process, plain PyTorch: the run's own engine
    engine = build_engine(plan, ds_config, step, Dist())

    def trivial_step():
        loss = sum(p.sum() for p in student.parameters())
        engine.backward(loss)
        engine.step()

    g = torch.Generator().manual_seed(0)
    if cross:
        batch = cross_batch(args.batch, args.length, args.vocab, g)
    else:
        x0 = torch.randint(0, args.vocab - 1, (args.batch, args.length), generator=g)
        batch = {"input_ids": x0, "maskable": torch.ones_like(x0, dtype=torch.bool)}
    phases = Phases(torch.device("cpu"))
    shapes = dict(
        batch=args.batch,
        length=args.length,
        vocab=args.vocab,
        hidden=args.hidden,
        layers=args.layers,
        teacher_hidden=args.teacher_hidden,
        teacher_layers=args.teacher_layers,
        passes=2 if terms.comp_demo else 1,
    )

    def real_step():
        g.manual_seed(1)  # the same noise every repeat: the same rows as the floor's
        noised = step.noise(batch, generator=g)
        targets = engine.teacher_targets(noised)
        student_step(engine, phases, noised, targets, progress=0.5)
        if "rows" in shapes:  # the same noise every call: counted once, no host sync in the timed steps
            return
        shapes["rows"] = int(noised.masked.sum())
        if teacher is None:
            shapes["teacher_rows"] = 0
        elif cross:
            shapes["teacher_rows"] = int(torch.isin(noised.teacher_pass_inputs[0], mask_id).sum())
        else:
            shapes["teacher_rows"] = shapes["rows"]

    return Bench(student, teacher, trivial_step, real_step, shapes)


def _worker(args) -> dict:
    import torch

    from tide_ds.engine.host import fix_mmap_threshold

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.heap == "fixed":
        fix_mmap_threshold()  # as tide-ds distill does
    base = resident()
    bench = build_bench(args)
    built = resident()
    floor_bytes = max(built, peak_resident(bench.trivial_step))
    states = resident()
    bench.real_step()  # warm-up: the step's shapes, lazy initialisation
    floor_call = matmul_floor(args.worker, bench.shapes)
    floor_call()  # warm-up
    floor_t, real_t, real_peak = [], [], []
    for _ in range(args.repeats):
        floor_t.append(seconds(floor_call))
        gc.collect()
        t0 = time.perf_counter()
        real_peak.append(peak_resident(bench.real_step))
        real_t.append(time.perf_counter() - t0)
    del floor_call
    return {
        "recipe": args.worker,
        "student_params": sum(p.numel() for p in bench.student.parameters()),
        "teacher_params": 0 if bench.teacher is None else sum(p.numel() for p in bench.teacher.parameters()),
        "runtime_bytes": base,
        "built_bytes": built,
        "states_bytes": states,
        "floor_bytes": floor_bytes,
        "real_peak_bytes": real_peak,
        "floor_s": floor_t,
        "real_s": real_t,
        "rows": bench.shapes["rows"],
        "teacher_rows": bench.shapes["teacher_rows"],
        "passes": bench.shapes["passes"],
    }


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def run(args) -> int:
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0
    from tide_ds.config import RECIPES as KNOWN

    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in KNOWN]
    if unknown:
        raise SystemExit(f"unknown recipe {unknown[0]!r}; choose from {', '.join(KNOWN)}")
    print(
        f"tide-ds bench floor: b={args.batch} l={args.length} V={args.vocab} student {args.layers}x{args.hidden} "
        f"teacher {args.teacher_layers}x{args.teacher_hidden} block {args.block_size} fp32 kernels={args.kernels} "
        f"device={device_name('cpu')}"
    )
    print(f"{args.repeats} alternating floor / step pairs per recipe, one process each; memory is peak RSS (GB)")
    header = (
        f"{'recipe':<12} {'rows':>5} {'mem floor':>9} {'step peak':>9} {'ratio':>6} "
        f"{'mm floor s':>10} {'step s':>7} {'ratio min':>9} {'ratio med':>9}"
    )
    lines = []
    for recipe in recipes:
        cmd = [sys.executable, "-m", "tide_ds.cli", "bench", "floor", "--worker", recipe]
        for key in (
            "batch",
            "length",
            "vocab",
            "hidden",
            "layers",
            "teacher_hidden",
            "teacher_layers",
            "block_size",
            "kernels",
            "repeats",
            "threads",
            "heap",
        ):
            if getattr(args, key) is not None:
                cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"bench worker {recipe} failed:\n{out.stderr[-4000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{recipe}: student {r['student_params'] / 1e6:.1f}M, teacher {r['teacher_params'] / 1e6:.1f}M params; "
            f"runtime {_gb(r['runtime_bytes'])} GB, built {_gb(r['built_bytes'])} GB, with states "
            f"{_gb(r['states_bytes'])} GB; {r['rows']} student rows, {r['teacher_rows']} teacher rows, "
            f"{r['passes']} teacher pass(es)",
            flush=True,
        )
        peak = min(r["real_peak_bytes"])
        ratios = [s / f for s, f in zip(r["real_s"], r["floor_s"])]
        lines.append(
            f"{recipe:<12} {r['rows']:>5} {_gb(r['floor_bytes']):>9} {_gb(peak):>9} "
            f"{peak / r['floor_bytes']:>6.3f} {min(r['floor_s']):>10.2f} {min(r['real_s']):>7.2f} "
            f"{min(ratios):>9.3f} {statistics.median(ratios):>9.3f}"
        )
    print(header)
    print("\n".join(lines))
    print("step peak: the least of the repeats; times: min; ratio: step time / matmul floor time, per pair")
    return 0
