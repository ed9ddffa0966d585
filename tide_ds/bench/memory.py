"""`tide-ds bench placement --memory`: each rank's peak resident memory in short distillation runs,
while the teacher is built and placed and during the first steps, for each teacher placement on
each rank count, next to the teacher's full size and the same run with recipe=ce (no teacher).

The parent writes, once into --work, a tokenizer trained on the standard library and two random
teachers of about --teacher-mib in --dtype (default bfloat16, as published checkpoints are; the
teacher is built in the checkpoint's own dtype): an LLaDA2-style MoE (64 experts) for replicate,
zero3, expert_parallel and megatron, and a dense Qwen3 for tensor_parallel. It then starts every run
with torchrun: a tiny BD3LM student under ZeRO-3, recipe tide_cross (ce for the baseline), the
sharding placements split over all ranks (ep_size / tp_size = ranks). Each rank runs the loop's own
pieces, `build_run` (data, student, teacher built and placed, engines) and `train_loop` (--steps
steps), and records its resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs at
the start of each) over each of the two.

"Above ce" is a rank's peak minus the same rank's peak in the baseline run; the bound a sharding
placement meets when the teacher is never whole on a rank is (1/N + 0.1) x the teacher's bytes
above the baseline while it is placed (N ranks). CPU only: it reads the kernel's count of the
process's resident pages.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

# experts are most of the MoE teacher (95% here; LLaDA2-mini: 256 experts, about 98%)
EXPERTS = 64
PLACEMENTS = ("replicate", "zero3", "expert_parallel", "tensor_parallel", "megatron")
SHARDING = ("zero3", "expert_parallel", "tensor_parallel", "megatron")
STUDENT = (
    "{hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, "
    "num_key_value_heads: 2, head_dim: 16, tie_word_embeddings: true}"
)


# --student-mib: a wider student whose layers hold its bytes (a small vocabulary: no module is a
# large share of it)
def _student_config(vocab: int, layers: int):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        tie_word_embeddings=True,
    )


ZERO3 = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 100000},
    "steps_per_print": 1000000000,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory", action="store_true", help="per-rank peak resident memory of each placement")
    p.add_argument("--ranks", default="2,4", help="rank counts, comma-separated (default 2,4)")
    p.add_argument("--placements", default=",".join(PLACEMENTS), help="comma-separated (default: all five)")
    p.add_argument("--teacher-mib", type=float, default=2048.0, help="teacher size in MiB (default 2048)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="the teachers' stored dtype")
    p.add_argument("--steps", type=int, default=2, help="training steps measured after the build (default 2)")
    p.add_argument(
        "--student-mib",
        type=float,
        default=0.0,
        help="a float32 ZeRO-3 student of about this size (default 0: a tiny one); the report gives each rank's "
        "peak while it is built above the resident set at the start, next to its bytes",
    )
    p.add_argument(
        "--student-from",
        choices=("init", "checkpoint"),
        default="init",
        help="--student-mib: a new model (student.init) or one read from a saved checkpoint (student.path)",
    )
    p.add_argument(
        "--work", help="a directory for the teachers and runs (default: a temporary one); kept teachers are reused"
    )
    p.add_argument("--json", help="also write every rank's figures to this file")
    # worker mode: one rank of one run (torchrun's parser matches any prefix of its own options,
    # even after the script: --run would be taken for its --run-path)
    p.add_argument("--worker-spec", help=argparse.SUPPRESS)


def run(args) -> int:
    if args.worker_spec:
        return _worker(args.worker_spec)
    if not args.memory:
        print(
            "tide-ds bench placement measures memory: add --memory (the teacher call's time and memory "
            "per placement: tide-ds bench teacher --placement P)"
        )
        return 2
    placements = [p for p in args.placements.split(",") if p and p != "none"]
    unknown = sorted(set(placements) - set(PLACEMENTS))
    if unknown:
        raise SystemExit(f"--placements: unknown {', '.join(unknown)}; choose from {', '.join(PLACEMENTS)}")
    if "megatron" in placements and not _have_megatron():
        print("megatron: skipped (megatron-core is not installed: pip install 'tide_ds[megatron]')")
        placements.remove("megatron")
    ranks = [int(n) for n in args.ranks.split(",") if n]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or tmp
        os.makedirs(work, exist_ok=True)
        assets = write_assets(work, args.teacher_mib, args.dtype, max(ranks))
        if args.student_mib:
            assets["student"] = write_student(work, args.student_mib, args.student_from)
        results = []
        for n in ranks:
            for placement in ["ce", *placements]:
                rows = _launch(work, assets, placement, n, args.steps)
                results.append({"placement": placement, "ranks": n, "rows": rows})
    report(results, assets)
    if "student" in assets:
        report_student(results, assets["student"])
    verdicts = placed_ratios(results, assets)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"assets": assets, "results": results, "placed": verdicts}, f, indent=1)
    return 1 if any(v["within"] is False for v in verdicts) else 0


def _have_megatron() -> bool:
    from tide_ds.engine.megatron import require_megatron

    try:
        require_megatron()
    except Exception:
        return False
    return True


# -- the assets: a tokenizer and two teachers of the asked size --------------------------------------


def _moe_config(vocab: int, layers: int):
    from tide_ds.models.llada2 import LLaDA2MoeConfig

    return LLaDA2MoeConfig(
        vocab_size=vocab,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        num_experts=EXPERTS,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        moe_intermediate_size=256,
        mask_token_id=vocab - 1,
        pad_token_id=0,
    )


def _dense_config(vocab: int, layers: int):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        tie_word_embeddings=True,
    )


def _bytes(make, vocab: int, layers: int, dtype) -> int:
    """Parameter bytes of the model config `make` gives, built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(make(vocab, layers), dtype=dtype)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _layers_for(make, vocab: int, target: float, dtype) -> int:
    one, two = _bytes(make, vocab, 1, dtype), _bytes(make, vocab, 2, dtype)
    return max(2, round((target - one) / (two - one)) + 1)


def write_assets(work: str, teacher_mib: float, dtype_name: str, max_ranks: int) -> dict:
    """The tokenizer and both teachers in `work` (kept ones reused when their size and dtype match)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tide_ds.models.llada2  # noqa: F401  (registers the LLaDA2 classes with the Auto classes)
    from tide_ds.data.corpus import corpus_files, train_tokenizer

    dtype = getattr(torch, dtype_name)
    tok_dir = os.path.join(work, "tokenizer")
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        train_tokenizer(corpus_files("stdlib", 30), 512, tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    vocab = len(tok) + len(tok) % 2  # even: megatron splits it
    assets = {"tokenizer": tok_dir, "dtype": dtype_name}
    for name, make in (("moe", _moe_config), ("dense", _dense_config)):
        layers = _layers_for(make, vocab, teacher_mib * 2**20, dtype)
        path = os.path.join(work, f"teacher_{name}")
        spec = {"layers": layers, "dtype": dtype_name, "vocab": vocab}
        spec_file = os.path.join(path, "bench_spec.json")
        if not (os.path.isfile(spec_file) and json.load(open(spec_file, encoding="utf-8")) == spec):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(make(vocab, layers), dtype=dtype)
            model.save_pretrained(path)  # config.json records the dtype: the runs build the teacher in it
            tok.save_pretrained(path)
            del model
            with open(spec_file, "w", encoding="utf-8") as f:
                json.dump(spec, f)
        assets[name] = {"path": path, "layers": layers, "bytes": _bytes(make, vocab, layers, dtype)}
    return assets


def write_student(work: str, student_mib: float, source: str) -> dict:
    """The --student-mib student: its student.init, and for --student-from checkpoint the model saved
    once in `work` (reused when its size matches)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(work, "tokenizer"))
    vocab = len(tok) + 1  # the mask token the student adds
    layers = _layers_for(_student_config, vocab, student_mib * 2**20, torch.float32)
    config = _student_config(vocab, layers)
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    init = "{" + ", ".join(f"{k}: {getattr(config, k)}" for k in (*keys, "head_dim")) + ", tie_word_embeddings: true}"
    student = {"init": init, "layers": layers, "bytes": _bytes(_student_config, vocab, layers, torch.float32)}
    if source == "checkpoint":
        path = os.path.join(work, "student")
        spec_file = os.path.join(path, "bench_spec.json")
        spec = {"layers": layers, "vocab": vocab}
        if not (os.path.isfile(spec_file) and json.load(open(spec_file, encoding="utf-8")) == spec):
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
            with open(spec_file, "w", encoding="utf-8") as f:
                json.dump(spec, f)
        student["path"] = path
    return student


# -- one run on N ranks ---------------------------------------------------------------------------


def overrides(work: str, assets: dict, placement: str, ranks: int, steps: int) -> list[str]:
    out_dir = os.path.join(work, "runs", f"{placement}_{ranks}")
    ds = os.path.join(work, "zero3.json")
    with open(ds, "w", encoding="utf-8") as f:
        json.dump(ZERO3, f)
    teacher = assets["dense" if placement == "tensor_parallel" else "moe"]["path"]
    student = assets.get("student", {"init": STUDENT})
    common = [
        f"student.path={student['path']}" if "path" in student else f"student.init={student['init']}",
        f"student.tokenizer={assets['tokenizer']}",
        f"teacher.path={teacher}",
        f"output_dir={out_dir}",
        "train.overwrite=true",
        "data.source=stdlib",
        "data.max_files=30",
        "data.seq_len=32",
        "diffusion.block_size=8",
        f"train.steps={steps}",
        "train.micro_batch_size=2",
        "train.warmup_steps=0",
        "train.eval_batches=1",
        "train.log_every=1",
        f"engine.ds_config={ds}",
    ]
    if placement == "ce":
        return [*common, "recipe=ce"]
    extra = {
        "expert_parallel": [f"engine.ep_size={ranks}"],
        "tensor_parallel": [f"engine.tp_size={ranks}"],
        "megatron": [f"engine.ep_size={ranks}"],
    }.get(placement, [])
    return [*common, "recipe=tide_cross", f"engine.teacher_placement={placement}", *extra]


def _launch(work: str, assets: dict, placement: str, ranks: int, steps: int) -> list[dict]:
    return launch(work, f"{placement}_{ranks}", overrides(work, assets, placement, ranks, steps), ranks)


def launch(work: str, name: str, run_overrides: list[str], ranks: int) -> list[dict]:
    """One run of `tide-ds distill` overrides on `ranks` ranks (torchrun): each rank's resident
    memory at the start, its peak while the run is built and during the steps (bytes)."""
    spec_file = os.path.join(work, f"run_{name}.json")
    out_file = os.path.join(work, f"rows_{name}.json")
    if os.path.exists(out_file):
        os.remove(out_file)
    with open(spec_file, "w", encoding="utf-8") as f:
        json.dump({"overrides": run_overrides, "out": out_file}, f)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nproc_per_node", str(ranks), "--master_port", str(port), "-m", "tide_ds.cli"]
    cmd += ["bench", "placement", "--worker-spec", spec_file]
    # glibc would keep freed blocks below a moving mmap threshold in its heap: a fixed 1 MiB
    # threshold returns large blocks at once, so the resident set follows what is in use
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="1048576")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0 or not os.path.isfile(out_file):
        raise RuntimeError(f"bench placement --memory: the {name} run on {ranks} ranks failed:\n{out.stderr[-3000:]}")
    with open(out_file, encoding="utf-8") as f:
        return json.load(f)


def _worker(spec_file: str) -> int:
    import torch

    from tide_ds.bench.measure import reset_peak, resident
    from tide_ds.config import load_config
    from tide_ds.engine import init_distributed, launched_world, load_ds_config, settle
    from tide_ds.engine.build import teacher_bytes
    from tide_ds.engine.preempt import Preemption
    from tide_ds.train import build_run, train_loop

    with open(spec_file, encoding="utf-8") as f:
        spec = json.load(f)
    cfg = load_config(None, spec["overrides"])
    plan, ds_config = settle(cfg, load_ds_config(cfg.engine.ds_config), launched_world())
    dist = init_distributed(plan.config, plan.deepspeed)
    with Preemption() as signals:
        start = reset_peak()
        run = build_run(plan, ds_config, dist, signals)
        build = resident("VmHWM")
        reset_peak()
        train_loop(run)
        steps = resident("VmHWM")
    module = run.engine.teacher.module
    row = {
        "rank": dist.rank,
        "start": start,
        "build": build,
        "steps": steps,
        "held": teacher_bytes(module) if module is not None else 0,
    }
    rows = [None] * dist.world
    torch.distributed.all_gather_object(rows, row)
    if dist.rank == 0:
        with open(spec["out"], "w", encoding="utf-8") as f:
            json.dump(rows, f)
    torch.distributed.barrier()
    # Everything is written: skip interpreter teardown, where the process groups' threads can abort.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# -- the report -----------------------------------------------------------------------------------


def teacher_of(placement: str, assets: dict) -> dict:
    return assets["dense" if placement == "tensor_parallel" else "moe"]


def above(result: dict, baseline: dict, key: str) -> list[int]:
    """Each rank's peak `key` minus the same rank's in the baseline run."""
    return [r[key] - b[key] for r, b in zip(result["rows"], baseline["rows"], strict=True)]


def bound(ranks: int) -> float:
    return 1 / ranks + 0.1


def placed_ratios(results: list[dict], assets: dict) -> list[dict]:
    """For each teacher run: its worst rank's build peak above the baseline, in teacher bytes, and
    whether a sharding placement keeps it within the bound."""
    baselines = {r["ranks"]: r for r in results if r["placement"] == "ce"}
    out = []
    for r in results:
        if r["placement"] == "ce":
            continue
        ratio = max(above(r, baselines[r["ranks"]], "build")) / teacher_of(r["placement"], assets)["bytes"]
        sharded = r["placement"] in SHARDING
        out.append(
            {
                "placement": r["placement"],
                "ranks": r["ranks"],
                "ratio": ratio,
                "sharded": sharded,
                "within": ratio <= bound(r["ranks"]) if sharded else None,
            }
        )
    return out


def report(results: list[dict], assets: dict) -> None:
    mib = 2**20
    print(
        f"tide-ds bench placement --memory: ZeRO-3 student, recipe tide_cross (baseline ce), teachers in "
        f"{assets['dtype']}: MoE {assets['moe']['bytes'] / mib:,.0f} MiB ({assets['moe']['layers']} layers, "
        f"{EXPERTS} experts), dense {assets['dense']['bytes'] / mib:,.0f} MiB ({assets['dense']['layers']} layers; "
        f"for tensor_parallel)"
    )
    print(
        "peak resident MiB per rank (VmHWM) while the teacher is built and placed (build) and during the "
        "first steps (steps); 'above ce': minus the same rank's peak in the recipe=ce run"
    )
    print(
        f"{'ranks':>5} {'placement':<15} {'rank':>4} {'teacher':>8} {'held':>7} {'build':>7} {'above ce':>9} "
        f"{'x teacher':>9} {'bound':>6} {'steps':>7} {'above ce':>9}"
    )
    baselines = {r["ranks"]: r for r in results if r["placement"] == "ce"}
    for r in results:
        n, name = r["ranks"], r["placement"]
        is_ce = name == "ce"
        whole = 0 if is_ce else teacher_of(name, assets)["bytes"]
        build, steps = above(r, baselines[n], "build"), above(r, baselines[n], "steps")
        for i, row in enumerate(r["rows"]):
            cells = (
                ["", "", "", ""]
                if is_ce
                else [
                    f"{build[i] / mib:,.0f}",
                    f"{build[i] / whole:.2f}",
                    f"{bound(n):.2f}" if name in SHARDING else "",
                    f"{steps[i] / mib:,.0f}",
                ]
            )
            print(
                f"{n:>5} {'ce (baseline)' if is_ce else name:<15} {row['rank']:>4} {whole / mib:>8,.0f} "
                f"{row['held'] / mib:>7,.0f} {row['build'] / mib:>7,.0f} {cells[0]:>9} {cells[1]:>9} {cells[2]:>6} "
                f"{row['steps'] / mib:>7,.0f} {cells[3]:>9}"
            )
    for v in placed_ratios(results, assets):
        verdict = (
            f"{'within' if v['within'] else 'OVER'} the bound {bound(v['ranks']):.2f}" if v["sharded"] else "no bound"
        )
        print(
            f"{v['placement']} on {v['ranks']} ranks: worst rank {v['ratio']:.2f} x the teacher above ce while "
            f"placed ({verdict})"
        )


def report_student(results: list[dict], student: dict) -> None:
    """Each rank's peak while the run is built (student, data, engines), above its resident set at the
    start, in the student's bytes."""
    mib, whole = 2**20, student["bytes"]
    source = "read from a checkpoint" if "path" in student else "a new model"
    print(f"student: {whole / mib:,.0f} MiB in float32 ({student['layers']} layers), {source}, ZeRO-3")
    for r in results:
        for row in r["rows"]:
            grown = row["build"] - row["start"]
            print(
                f"{r['ranks']} ranks, {r['placement']}, rank {row['rank']}: build peak {grown / mib:,.0f} MiB above "
                f"the start ({grown / whole:.2f} x the student)"
            )
