"""The bad inputs and faults of docs/faults.md's second table: a used output directory, a stalled
rank, unchecked model configs, overwritten outputs, held-out rows shared with training, resumes
that change the model, and the one-line refusals. The worst cases run end to end through the CLI."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest
from test_engine import BIN, REPO, _args, _port, launch

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


# -- no rank waits forever ------------------------------------------------------------------------


@pytest.mark.multirank
@pytest.mark.slow
def test_a_stopped_rank_ends_the_job_within_the_timeout_naming_it(tiny_overrides, tmp_path):
    timeout = 15
    args = _args(
        tiny_overrides,
        tmp_path / "run",
        "recipe=ce",
        "train.steps=1000",
        f"engine.ds_config={ZERO2}",
        f"engine.timeout_s={timeout}",
    )
    path = os.pathsep.join(p for p in (str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env["TIDE_TEST_SIGNAL"] = "SIGSTOP@3@1"  # rank 1 stops itself in its 4th step
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_port()), "-m", "preempt_main"]
    proc = subprocess.Popen(
        [*cmd, "distill", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=240)  # a hang (the old behaviour) fails here
        ended = time.time()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the stopped rank too, whatever happened
        proc.wait()
    assert proc.returncode != 0
    m = re.search(r"\[rank 0\] tide-ds: error: rank 1 has sent no heartbeat for (\d+) s .*engine.timeout_s=15", err)
    assert m, err[-3000:]
    assert timeout <= int(m.group(1)) <= timeout + 5
    stopped = float(re.search(r"rank 1 gets SIGSTOP at ([\d.]+)", out).group(1))
    # torchrun gives a rank 30 s to take its SIGTERM (a stopped one cannot) before SIGKILL
    assert ended - stopped <= timeout + 5 + 30 + 10, (ended - stopped, err[-3000:])


def test_each_rank_fsyncs_and_sizes_the_deepspeed_files_it_wrote_bf16_optimizer_states_too(tmp_path):
    step = tmp_path / "step2.partial" / "step2"
    step.mkdir(parents=True)
    names = {
        "mp_rank_00_model_states.pt": 0,  # rank 0 writes the model states
        "zero_pp_rank_0_mp_rank_00_optim_states.pt": 0,
        "zero_pp_rank_1_mp_rank_00_optim_states.pt": 1,
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt": 0,
        "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt": 1,
    }
    for i, name in enumerate(names):
        (step / name).write_bytes(b"x" * (i + 1))
    for rank in (0, 1):
        mine = checkpoint._own_files(str(tmp_path / "step2.partial"), rank)  # {file: (size, checksum)}
        assert {k: size for k, (size, _) in mine.items()} == {
            f"step2/{n}": i + 1 for i, n in enumerate(names) if names[n] == rank
        }
        assert all(
            digest == checkpoint._checksum(str(tmp_path / "step2.partial" / k)) for k, (_, digest) in mine.items()
        )
