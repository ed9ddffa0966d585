"""The bad inputs and faults of docs/faults.md's second table: a used output directory, a stalled
rank, unchecked model configs, overwritten outputs, held-out rows shared with training, resumes
that change the model, and the one-line refusals. The worst cases run end to end through the CLI."""

import json
import os
import shutil

import pytest
from test_engine import REPO, _args, launch

from tide_ds import checkpoint, cli

ZERO2 = str(REPO / "ds_configs" / "zero2.json")


def distill_cli(*args) -> int:
    return cli.main(["distill", *args])


# -- runs own their output directory --------------------------------------------------------------


def test_a_fresh_run_refuses_another_runs_output_dir_and_overwrite_replaces_it(tiny_overrides, tmp_path, capsys):
    over = tiny_overrides + ["recipe=ce", "train.steps=2", "train.save_every=1", "train.keep_last=0"]
    root = tmp_path / "run" / "checkpoints"
    assert distill_cli(*over) == 0
    first = (root / checkpoint.RUN).read_text()
    kept = sorted(os.listdir(root))
    assert kept == ["hf", "latest", "run", "step1", "step2"]
    capsys.readouterr()
    assert distill_cli(*over, "train.steps=3") == 2
    err = capsys.readouterr().err
    assert "holds the checkpoints of another run (step2, step1); continue it with --resume latest" in err
    assert err.count("\n") == 1 and sorted(os.listdir(root)) == kept  # nothing deleted
    assert distill_cli(*over, "train.steps=1", "train.overwrite=true") == 0
    assert "deleting the checkpoints of the previous run" in capsys.readouterr().out
    assert (root / checkpoint.RUN).read_text() != first
    assert sorted(os.listdir(root)) == ["hf", "latest", "run", "step1"]


def test_resume_and_rotation_keep_to_the_run_that_owns_the_directory(tiny_overrides, tmp_path, capsys):
    over = tiny_overrides + ["recipe=ce", "train.steps=2", "train.save_every=1", "train.keep_last=2"]
    root = tmp_path / "run" / "checkpoints"
    assert distill_cli(*over) == 0
    # another run's checkpoint with a higher step (copied in, or left by a run that shared the directory)
    shutil.copytree(root / "step2", root / "step9")
    marker = json.loads((root / "step9" / checkpoint.MARKER).read_text())
    (root / "step9" / checkpoint.MARKER).write_text(json.dumps({**marker, "run": "someone-else"}))
    capsys.readouterr()
    assert distill_cli(*over, "train.steps=4", "--resume", "latest") == 0
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and "step9 (another run)" in out
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["first_step"] == 2
    assert sorted(os.listdir(root)) == ["hf", "latest", "run", "step3", "step4", "step9"]  # step9 untouched
    assert (root / "latest").read_text() == "step4"


@pytest.mark.multirank
@pytest.mark.slow
def test_rank_0_decides_the_checkpoint_every_rank_resumes(tiny_overrides, tmp_path):
    common = [
        "recipe=ce",
        "train.save_every=1",
        "train.keep_last=0",
        f"engine.ds_config={ZERO2}",
        "engine.timeout_s=60",
    ]
    out, _ = launch("torchrun", _args(tiny_overrides, tmp_path / "run", *common, "train.steps=2"))
    assert out.returncode == 0, out.stderr[-3000:]
    out, _ = launch(
        "torchrun",
        _args(tiny_overrides, tmp_path / "run", *common, "train.steps=3", "--resume", "latest"),
        entry="stale_view_main",
        timeout=300,
    )
    assert "rank 0 resumes step2" in out.stdout and "rank 1 resumes step2" in out.stdout, out.stdout[-3000:]
    assert out.returncode == 0, out.stderr[-3000:]
    marker = json.loads((tmp_path / "run" / "checkpoints" / "step3" / checkpoint.MARKER).read_text())
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(
        marker["files"]
    )
