"""Outputs never overwritten or half-written, resumes that check what matters, and the command
line's remaining bad inputs: each case of docs/faults.md's table that these cover, one test each."""

import json
import os
import shlex
import subprocess

import pytest
from test_engine import BIN
from test_faults import cli, finish


@pytest.mark.slow
def test_overrides_after_resume_as_sigterm_prints_it_parse_and_run(tiny_overrides, tmp_path):
    over = tiny_overrides + ["recipe=ce", "train.steps=4"]
    # overrides on both sides of an option: argparse alone refuses the second group
    out = finish(
        cli(
            ["distill", *over[:2], "--resume", "auto", *over[2:]],
            {"TIDE_TEST_SIGNAL": "SIGTERM@1@0"},
            entry="preempt_main",
        )
    )
    assert out.returncode == 143, out.stderr[-2000:]
    command = next(ln for ln in out.stdout.splitlines() if "saved checkpoint" in ln).split("resume with: ")[1]
    assert command.endswith(" --resume latest")
    resumed = subprocess.run(
        [str(BIN / "tide-ds"), *shlex.split(command)[1:], "train.log_every=2"],  # one more, after --resume latest
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["first_step"] == 2 and metrics["steps"] == 4
