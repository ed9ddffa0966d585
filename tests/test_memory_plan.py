"""`tide-ds plan`: bad input, the placements' and ZeRO stages' arithmetic on meta-built models,
the paper's table in docs/placements.md, and the plan against measured peak memory on CPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tide_ds.config import ConfigError, load_config
from tide_ds.engine.memory import (
    device_memory,
    memory_plan,
    parse_bytes,
    plan_summary,
    plan_table,
    shapes,
    startup_summary,
    student_config,
    teacher_config,
)
from tide_ds.engine.plan import load_ds_config, settle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = os.path.join(ROOT, "tests", "fixtures", "paper", "run.yaml")
PLACEMENTS = {  # the paper's set-up on 8 ranks, one row per placement (megatron: tp 2 x ep 4)
    "replicate": [],
    "zero3": [],
    "expert_parallel": ["engine.ep_size=8"],
    "tensor_parallel": ["engine.tp_size=8"],
    "megatron": ["engine.tp_size=2", "engine.ep_size=4"],
}
TEACHER_LEN = 1024


def _plan(overrides: list[str], world: int, config: str | None = PAPER, device: str = "cuda", **kw):
    cfg = load_config(config, overrides, check_files=False)
    ds = load_ds_config(cfg.engine.ds_config) if cfg.engine.ds_config else None
    plan, ds_config = settle(cfg, ds, world)
    return memory_plan(plan, ds_config, device=device, **kw)


@pytest.fixture(autouse=True)
def _in_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the fixture's paths are relative to the repository


def test_bad_input_is_one_clear_line():
    with pytest.raises(ConfigError, match="--device-memory='80 GX'"):
        parse_bytes("80 GX")
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("1.5GB") == 1_500_000_000
    with pytest.raises(ConfigError, match="engine.ep_size=3 does not divide the teacher's 256 experts per layer"):
        _plan(["engine.teacher_placement=expert_parallel", "engine.ep_size=3"], 8)
    with pytest.raises(ConfigError, match=r"tp_size=3 and engine.ep_size=1 must each divide the number of ranks \(8\)"):
        _plan(["engine.teacher_placement=megatron", "engine.tp_size=3"], 8)
    with pytest.raises(ConfigError, match=r"engine.ep_size=16 does not divide the number of ranks \(8\)"):
        _plan(["engine.teacher_placement=expert_parallel", "engine.ep_size=16"], 8)
    with pytest.raises(ConfigError, match="tensor_parallel .AutoTP. is for dense teachers; LLaDA2MoeModelLM is an MoE"):
        _plan(["engine.teacher_placement=tensor_parallel", "engine.tp_size=8"], 8)
    out = subprocess.run(
        [sys.executable, "-m", "tide_ds.cli", "plan", "--config", PAPER, "--world", "8", "--device-memory", "80 GX"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--device-memory" in out.stderr


def test_placements_and_stages_split_what_they_should():
    """Exact bytes from the meta-built models: the paper's LLaDA2.0-mini is about 16B parameters."""
    cfg = load_config(PAPER, [], check_files=False)
    t = shapes(teacher_config(cfg))
    assert 15.5e9 < t.params < 16.7e9 and t.experts / t.params > 0.9
    whole = _plan([], 8).parts["teacher"]
    assert whole == 2 * t.params
    assert _plan(["engine.teacher_placement=zero3"], 8).parts["teacher"] == 2 * (t.params // 8 + 2 * t.largest_layer)
    ep = _plan(["engine.teacher_placement=expert_parallel", "engine.ep_size=8"], 8).parts["teacher"]
    assert ep == 2 * (t.params - t.experts + t.experts // 8)
    # the student under ZeRO 0 / 2 / 3: what each stage splits over the ranks
    z3 = _plan([], 8).parts
    z2 = _plan(["engine.ds_config=ds_configs/zero2.json"], 8).parts
    p = shapes(student_config(cfg)).params
    assert 0.59e9 < p < 0.61e9  # Qwen3-0.6B, tied embeddings counted once
    assert z3["student_params"] == 2 * p // 8 and z2["student_params"] == 2 * p
    assert z3["optimizer"] == z2["optimizer"] == 12 * p // 8  # fp32 master + Adam's moments, split
    assert z3["step_workspace"] == (4 + 4) * p // 8  # fp32 gradients + torch AdamW's denominator (CUDA)
    off = _plan(["engine.ds_config=ds_configs/zero3_offload.json"], 8)
    assert off.parts["optimizer"] == off.parts["step_workspace"] == off.parts["student_params"] == 0
    assert off.host == 2 * p // 8 + (12 + 4) * p // 8  # the step runs on the host (DeepSpeedCPUAdam)
    ckpt = _plan(["engine.activation_checkpointing=true"], 8)
    assert ckpt.parts["activations"] == ckpt.activations_checkpointed < ckpt.activations_full / 5
    small = _plan([], 8, device_memory=8 * 2**30)
    assert not small.fits and small.largest_micro_batch < _plan([], 8).largest_micro_batch


def test_distill_start_up_line_is_the_plans_summary():
    """What build_run logs: one line, the same plan, against this machine's memory (plain PyTorch here)."""
    import torch

    cfg = load_config(PAPER, ["engine.ds_config=null", "train.precision=fp32"], check_files=False)
    plan, ds_config = settle(cfg, None, 1)
    line = startup_summary(plan, ds_config, torch.device("cpu"))
    expected = memory_plan(plan, ds_config, device_memory(torch.device("cpu")), "cpu")
    assert line == plan_summary(expected) and "\n" not in line and "ZeRO 0" in line


def paper_tables() -> str:
    """What `tide-ds plan` prints for the paper's set-up, placement by placement."""
    out = []
    for placement, extra in PLACEMENTS.items():
        args = [f"engine.teacher_placement={placement}", *extra]
        command = f"tide-ds plan --config tests/fixtures/paper/run.yaml --world 8 --teacher-len {TEACHER_LEN}"
        try:
            table = plan_table(_plan(args, 8, teacher_len=TEACHER_LEN))
        except ConfigError as e:  # tensor_parallel: AutoTP takes no MoE
            table = f"tide-ds plan: error: {e}"
        out.append(f"$ {command} {' '.join(args)}\n{table}")
    return "\n\n".join(out)


def test_docs_show_what_plan_prints_for_the_paper():
    doc = open(os.path.join(ROOT, "docs", "placements.md"), encoding="utf-8").read()
    m = re.search(r"<!-- plan:begin -->\n```\n(.*?)```\n<!-- plan:end -->", doc, re.S)
    assert m, "docs/placements.md has no plan block"
    assert m.group(1) == paper_tables() + "\n"


if __name__ == "__main__":  # prints the docs' block
    os.chdir(ROOT)
    print(paper_tables())


# -- the plan against measured peak memory (CPU, 2 ranks) -------------------------------------------

STUDENT = (
    "{hidden_size: 768, intermediate_size: 2048, num_hidden_layers: 8, num_attention_heads: 12, "
    "num_key_value_heads: 4, head_dim: 64, tie_word_embeddings: true}"
)
MEASURED = {  # name -> (ZeRO config, placement overrides, micro-batch)
    "z3_replicate_b2": ("zero3", ["engine.teacher_placement=replicate"], 2),
    "z2_zero3_b4": ("zero2", ["engine.teacher_placement=zero3"], 4),
    "z3_expert_parallel_b8": ("zero3", ["engine.teacher_placement=expert_parallel", "engine.ep_size=2"], 8),
}


def measured_overrides(work: str, assets: dict, name: str) -> list[str]:
    zero, placement, micro = MEASURED[name]
    return [
        f"student.init={STUDENT}",
        f"student.tokenizer={assets['tokenizer']}",
        f"teacher.path={assets['moe']['path']}",
        f"output_dir={os.path.join(work, 'runs', name)}",
        "train.overwrite=true",
        "data.source=stdlib",
        "data.max_files=30",
        "data.seq_len=64",
        "diffusion.block_size=8",
        "train.steps=1",
        f"train.micro_batch_size={micro}",
        "train.warmup_steps=0",
        "train.eval_batches=1",
        "train.precision=bf16",
        "recipe=tide_cross",
        f"engine.ds_config={os.path.join(ROOT, 'ds_configs', zero + '.json')}",
        *placement,
    ]


def compare(work: str) -> list[dict]:
    """Each configuration's plan (CPU) next to each rank's measured peak during the steps above
    its resident memory at the start (tide_ds.bench.memory's worker)."""
    from tide_ds.bench.memory import launch, write_assets

    assets = write_assets(work, 150.0, "bfloat16", 2)
    rows = []
    for name in MEASURED:
        overrides = measured_overrides(work, assets, name)
        plan = _plan(overrides, 2, config=None, device="cpu")
        ranks = launch(work, name, overrides, 2)
        measured = max(r["steps"] - r["start"] for r in ranks)
        rows.append({"name": name, "plan": plan.total, "measured": measured, "ratio": plan.total / measured})
    return rows


# Three 2-rank runs of several minutes each, and not met yet: a ZeRO-3 student peaks about 300 MiB
# per rank above the plan (docs/placements.md). Run it with TIDE_DS_MEASURE_PLAN=1.
@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.skipif(not os.environ.get("TIDE_DS_MEASURE_PLAN"), reason="a measurement: set TIDE_DS_MEASURE_PLAN=1")
def test_plan_is_within_15_percent_of_measured_peak_memory(tmp_path):
    """Three 2-rank CPU runs (ZeRO-3 / ZeRO-2 students; replicate, zero3, expert_parallel teachers;
    micro-batches 2, 4, 8): the plan's total per rank within 15% of the worst rank's peak resident
    memory during the steps, above its resident memory before the run is built."""
    rows = compare(str(tmp_path))
    for r in rows:
        mib = {k: f"{r[k] / 2**20:,.0f} MiB" for k in ("plan", "measured")}
        print(f"{r['name']}: plan {mib['plan']}, measured {mib['measured']}, x{r['ratio']:.2f}")
    assert all(0.85 <= r["ratio"] <= 1.15 for r in rows), rows
