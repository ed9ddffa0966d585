"""Sharded construction: each sharding placement builds its teacher without its weights and reads
only its part of the checkpoint; the result equals the whole teacher. The ZeRO-3 student likewise."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_engine import launch
from tiny import llada2

from tide_ds.models import build_teacher
from tide_ds.models.load import Checkpoint

REPO = Path(__file__).resolve().parent.parent

CASES = ("zero3", "expert_parallel", "expert_parallel_bf16", "tensor_parallel", "zero3_dense", "zero3_persistent")
STUDENTS = ("student_init", "student_checkpoint")  # the ZeRO-3 student, new and from a checkpoint


@pytest.mark.multirank
def test_every_sharding_placement_reads_its_part_and_equals_the_whole_teacher(tmp_path):
    out, seconds = launch("torchrun", [str(tmp_path / "sb")], entry="sharded_build_main", timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for rank in (0, 1):
        r = json.loads((tmp_path / f"sb.rank{rank}.json").read_text())
        assert set(r) == {"rank", *CASES, *STUDENTS}, r
        for name in (*CASES, *STUDENTS):
            got = r[name]
            assert got["max_diff"] <= 1e-5 and got["meta_left"] == 0, (name, got)
            if name != "zero3_persistent":
                assert got["held"] < 0.75 * got["whole"], (name, got)
            assert got["meta_whole"] == got["whole"], (name, got)
        # the dtype the config asks for, read straight into it (the checkpoint is float32)
        assert r["expert_parallel_bf16"]["dtypes"] == ["torch.bfloat16"], r
        assert r["zero3"]["dtypes"] == ["torch.float32"], r
        assert r["zero3"]["held"] * 2 == r["zero3"]["whole"], r  # an even split: every tensor partitioned
        for name in STUDENTS:  # equal to the whole build (max_diff above: exactly), nothing drawn differently
            assert r[name]["max_diff"] == 0 and r[name]["same_draws"], r[name]
            assert r[name]["dtypes"] == ["torch.float32"], r[name]
    print(f"sharded construction, 2 ranks: {seconds:.0f} s")


def test_checkpoint_reads_slices_flat_ranges_and_stacked_experts_as_stored(tmp_path):
    from safetensors.torch import load_file

    model = llada2(seed=0, num_hidden_layers=2).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="20KB")  # several files and an index
    stored = {}
    for f in tmp_path.glob("*.safetensors"):
        stored.update(load_file(f))
    assert (tmp_path / "model.safetensors.index.json").is_file()
    with Checkpoint(str(tmp_path)) as ckpt:
        for name, t in stored.items():
            assert ckpt.shape(name) == list(t.shape) and ckpt.dtype(name) == torch.bfloat16
            assert torch.equal(ckpt.read(name), t)
            if t.dim() >= 1 and t.shape[0] > 2:
                assert torch.equal(ckpt.read(name, 0, 1, t.shape[0] - 1), t[1:-1])
                assert torch.equal(ckpt.read_flat(name, 3, t.numel() - 2), t.reshape(-1)[3:-2])
            if t.dim() == 2 and t.shape[1] > 2:
                assert torch.equal(ckpt.read(name, 1, 1, 3), t[:, 1:3])
        experts = model.model.layers[1].mlp.experts
        name = "model.layers.1.mlp.experts.down_proj"  # stacked in memory, per expert on disk
        whole = experts.down_proj.detach()
        assert ckpt.shape(name) == list(whole.shape)
        assert torch.equal(ckpt.read(name, 0, 1, 3), whole[1:3])
        assert torch.equal(ckpt.read(name, 1, 2, 5), whole[:, 2:5])
        n = whole[0].numel()
        assert torch.equal(ckpt.read_flat(name, n - 3, 2 * n + 4), whole.reshape(-1)[n - 3 : 2 * n + 4])


def test_dtype_auto_is_the_checkpoints_own_and_the_students_float32_unless_deepspeed_trains_in_bf16(tmp_path):
    from tide_ds.config import Config
    from tide_ds.engine import settle
    from tide_ds.models.build import dtype_name

    llada2(seed=0).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    llada2(seed=0).save_pretrained(tmp_path / "fp32")
    cfg = Config()
    cfg.teacher.path, cfg.teacher.mask_token_id = str(tmp_path / "bf16"), 63
    assert cfg.teacher.dtype == "auto" and dtype_name(cfg.teacher) == "bfloat16"
    assert build_teacher(cfg.teacher, "<|mask|>").model.dtype == torch.bfloat16
    assert build_teacher(cfg.teacher, "<|mask|>", weights=False).model.dtype == torch.bfloat16
    cfg.teacher.path = str(tmp_path / "fp32")
    assert dtype_name(cfg.teacher) == "float32"
    cfg.teacher.dtype = "bfloat16"  # an explicit dtype wins
    assert dtype_name(cfg.teacher) == "bfloat16"
    assert dtype_name(Config().student) == "float32"  # a new model (student.init)
    plain, _ = settle(Config(), None, 1)
    assert plain.config.student.dtype == "float32"
    bf16 = Config()
    bf16.train.precision = "bf16"
    assert settle(bf16, {"zero_optimization": {"stage": 2}}, 2)[0].config.student.dtype == "auto"
    assert settle(Config(), {"zero_optimization": {"stage": 2}}, 2)[0].config.student.dtype == "float32"


@pytest.mark.multirank
@pytest.mark.slow
def test_bench_placement_memory_keeps_every_sharded_teacher_within_its_bound(tmp_path):
    """`tide-ds bench placement --memory` at 256 MiB on 2 ranks: each sharding placement's worst rank
    peaks within (1/2 + 0.1) x the teacher above the recipe=ce run while the teacher is placed, and
    above 0.4 x: each rank holds half, so a measure that missed the teacher fails (a replicated one,
    1.90 x in docs/placements.md, is left out to keep the test short)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    placements = "zero3,expert_parallel,tensor_parallel"
    cmd = [sys.executable, "-m", "tide_ds.cli", "bench", "placement", "--memory", "--ranks", "2", "--steps", "1"]
    cmd += [
        "--placements",
        placements,
        "--teacher-mib",
        "256",
        "--work",
        str(tmp_path),
        "--json",
        str(tmp_path / "m.json"),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    placed = {v["placement"]: v for v in json.loads((tmp_path / "m.json").read_text())["placed"]}
    assert set(placed) == set(placements.split(",")), placed
    for name in placements.split(","):
        assert placed[name]["within"] and 0.4 <= placed[name]["ratio"] <= 0.6, placed[name]
    assert "within the bound 0.60" in out.stdout
    print(out.stdout)
