"""Run length in epochs, the warm-up ratio, a floor of 0 in the LR curve, and bf16 in one process."""

import math

import pytest

from tide_ds.config import epoch_steps, load_config
from tide_ds.engine.build import lr_lambda
from tide_ds.train import build_data, distill, student_tokenizer


def test_epochs_give_the_expected_step_count(tiny_overrides):
    assert epoch_steps(10, 1000, 64) == 150 and epoch_steps(2, 1000, 64) == 30 and epoch_steps(0.5, 10, 64) == 1
    cfg = load_config(
        None,
        tiny_overrides
        + ["train.epochs=0.5", "train.log_every=100", "data.max_files=2", "train.gradient_accumulation_steps=8"],
    )
    rows = len(build_data(cfg, student_tokenizer(cfg)).train)
    result = distill(cfg)
    assert result["steps"] == math.ceil(0.5 * (rows // 16)) != 4  # micro batch 2 x 8 accumulation, one rank


def test_warmup_ratio_and_a_floor_of_zero():
    cfg = load_config(
        None,
        [
            "student.init={vocab_size: 8}",
            "recipe=ce",
            "train.steps=100",
            "train.warmup_ratio=0.1",
            "train.min_lr_ratio=0",
        ],
    )
    f = lr_lambda(cfg)
    # reference: linear warm-up over ceil(0.1 * 100) = 10 steps, then half a cosine from 1 to 0
    for step in range(100):
        want = (step + 1) / 10 if step < 10 else 0.5 * (1 + math.cos(math.pi * (step - 10) / 90))
        assert f(step) == pytest.approx(want, abs=1e-12)
    assert f(100) == pytest.approx(0.0, abs=1e-12) and f(9) == 1.0


def test_bf16_run_trains_close_to_fp32(tiny_overrides):
    """train.precision=bf16 in one process: finite losses, within a tolerance of the fp32 run."""
    runs = {}
    for precision in ("fp32", "bf16"):
        over = tiny_overrides + [
            f"train.precision={precision}",
            "recipe=tide_shared",
            "train.steps=4",
            f"output_dir={tiny_overrides[3].split('=', 1)[1]}-{precision}",
        ]
        runs[precision] = distill(load_config(None, over))["history"]
    for a, b in zip(runs["fp32"], runs["bf16"]):
        assert math.isfinite(b["loss"])
        assert b["loss"] == pytest.approx(a["loss"], rel=0.05), (a, b)
    assert any(a["loss"] != b["loss"] for a, b in zip(runs["fp32"], runs["bf16"]))  # bf16 did run
