"""Nothing lost: atomic checkpoints under a kill at any point of a save, pre-emption saves on 1 and
2 ranks, the non-finite guard, a full disk, rotation, and one test per row of docs/faults.md."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import uuid

import pytest
import torch
from test_engine import BIN, REPO, ZERO3, _args, assert_same_weights, launch
from transformers import AutoModelForCausalLM

from tide_ds import checkpoint
from tide_ds.config import ConfigError, load_config
from tide_ds.engine.guard import NonFiniteError
from tide_ds.train import distill


def cli(args, env=None, entry="tide_ds.cli") -> subprocess.Popen:
    """Starts `python -m entry args` (one process); several run side by side, read with `finish`."""
    path = os.pathsep.join(p for p in (str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **(env or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.Popen(
        [sys.executable, "-m", entry, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen, timeout=300) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def finite_checkpoints(root):
    """{tag: whether every weight is finite} for the complete checkpoints under root."""
    out = {}
    for _, tag in checkpoint._steps(str(root)):
        if checkpoint.why_incomplete(str(root), tag) is None:
            sd = checkpoint.student_state_dict(str(root), tag)
            out[tag] = all(torch.isfinite(v).all() for v in sd.values())
    return out


# -- a kill at any point of a save ----------------------------------------------------------------


@pytest.mark.slow
def test_a_kill_at_any_point_of_a_save_leaves_resume_latest_exact(tiny_overrides, tmp_path):
    over = [o for o in tiny_overrides if not o.startswith("output_dir=")] + [
        "recipe=ce",
        "train.steps=6",
        "train.save_every=2",
        "train.keep_last=0",
    ]
    points = {"states": "step2", "marker": "step2", "rename": "step4", "latest": "step4"}  # -> resumes from
    runs = {
        p: cli(["distill", *over, f"output_dir={tmp_path / p}"], env={checkpoint.KILL_AT: f"{p}@4"}) for p in points
    }
    full = distill(load_config(None, over + [f"output_dir={tmp_path / 'full'}"]))
    for point, tag in points.items():
        out = finish(runs[point])
        assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
        assert checkpoint.why_incomplete(str(tmp_path / point / "checkpoints"), "step2") is None
        resumed = distill(load_config(None, over + [f"output_dir={tmp_path / point}", "train.resume=latest"]))
        assert resumed["first_step"] == int(tag[4:]), point
        assert_same_weights(full["student_dir"], resumed["student_dir"], atol=1e-6)


def test_resume_latest_says_what_it_skipped_and_auto_starts_fresh(tiny_overrides, tmp_path, capsys):
    over = tiny_overrides + ["recipe=ce", "train.steps=2", "train.save_every=1"]
    result = distill(load_config(None, over + ["train.resume=auto"]))
    assert result["first_step"] == 0 and "no complete checkpoint in" in capsys.readouterr().out
    root = tmp_path / "run" / "checkpoints"
    shutil.copytree(root / "step2", root / "step3.partial")  # an interrupted save of a later step
    shutil.copytree(root / "step2", root / "step4")
    (root / "step4" / checkpoint.MARKER).unlink()  # a checkpoint without its marker (an older layout)
    with pytest.raises(ConfigError, match="train.resume=latest: no complete checkpoint"):
        distill(load_config(None, [o.replace("output_dir=", "output_dir=x") for o in over] + ["train.resume=latest"]))
    resumed = distill(load_config(None, over + ["train.resume=latest"]))
    log = capsys.readouterr().out
    assert "skipping checkpoint" in log and "step3.partial (an interrupted save)" in log
    assert "step4 (incomplete (no tide_state.json" in log and re.search(r"resume: from .*step2", log)
    assert resumed["first_step"] == 2


def test_rotation_keeps_the_newest_complete_checkpoints(tiny_overrides, tmp_path):
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    (root / "step9.partial").mkdir()  # left by an interrupted save: removed by the next save
    distill(
        load_config(None, tiny_overrides + ["recipe=ce", "train.steps=5", "train.save_every=1", "train.keep_last=2"])
    )
    assert sorted(os.listdir(root)) == ["hf", "latest", "run", "step4", "step5"]
    assert (root / "latest").read_text() == "step5"
    assert all(checkpoint.why_incomplete(str(root), t) is None for t in ("step4", "step5"))


# -- pre-emption ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_signal_saves_a_checkpoint_that_resumes_exactly(tiny_overrides, tmp_path):
    over = [o for o in tiny_overrides if not o.startswith("output_dir=")] + ["recipe=ce", "train.steps=6"]
    statuses = {"SIGTERM": 143, "SIGINT": 130, "SIGUSR1": 138}
    runs = {
        name: cli(
            ["distill", *over, f"output_dir={tmp_path / name}"],
            env={"TIDE_TEST_SIGNAL": f"{name}@2@0"},
            entry="preempt_main",
        )
        for name in statuses
    }
    for name, status in statuses.items():
        out = finish(runs[name])
        assert out.returncode == status, out.stdout[-2000:] + out.stderr[-2000:]
        line = [ln for ln in out.stdout.splitlines() if "saved checkpoint" in ln]
        step3 = tmp_path / name / "checkpoints" / "step3"
        assert len(line) == 1 and f"{name}: saved checkpoint {step3} (step 3 of 6)" in line[0], out.stdout[-2000:]
        assert checkpoint.why_incomplete(str(step3.parent), "step3") is None
    command = line[0].split("resume with: ")[1]
    assert command.startswith("tide-ds distill ") and command.endswith(" --resume latest")
    # the printed command, run as printed, continues to the end, as if never interrupted
    resumed = subprocess.Popen(
        [str(BIN / "tide-ds"), *shlex.split(command)[1:]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    full = distill(load_config(None, over + [f"output_dir={tmp_path / 'full'}"]))
    resumed = finish(resumed)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((tmp_path / name / "metrics.json").read_text())["first_step"] == 3
    assert_same_weights(full["student_dir"], tmp_path / name / "final", atol=1e-6)


@pytest.mark.multirank
@pytest.mark.slow
def test_sigterm_on_one_of_2_ranks_saves_every_rank_and_resumes_exactly(tiny_overrides, tmp_path):
    common = ["recipe=ce", "train.steps=4", "train.warmup_steps=0", "train.lr=3e-3", f"engine.ds_config={ZERO3}"]
    out, _ = launch(
        "deepspeed",
        _args(tiny_overrides, tmp_path / "dist", *common),
        entry="preempt_main",
        env={"TIDE_TEST_SIGNAL": "SIGTERM@1@1"},
    )
    assert out.returncode == 143, out.stdout[-3000:] + out.stderr[-3000:]
    step = tmp_path / "dist" / "checkpoints" / "step2"
    assert re.search(
        r"SIGTERM: saved checkpoint .*step2 \(step 2 of 4\); resume with: tide-ds distill .* "
        r"--resume latest \(under the same launcher, 2 ranks\)",
        out.stdout,
    ), out.stdout[-3000:]
    assert json.loads((step / checkpoint.MARKER).read_text())["world"] == 2
    for rank in (0, 1):
        assert (step / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file()
    out, _ = launch("torchrun", _args(tiny_overrides, tmp_path / "dist", *common, "--resume", "auto"))
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = json.loads((tmp_path / "dist" / "metrics.json").read_text())
    assert resumed["first_step"] == 2 and resumed["world"] == 2
    single = distill(
        load_config(None, _args(tiny_overrides, tmp_path / "one", *common[:-1], "train.gradient_accumulation_steps=2"))
    )
    assert_same_weights(resumed["student_dir"], single["student_dir"], atol=1e-5, adam_lr=3e-3)


# -- numerics -------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["plain", pytest.param("deepspeed", marks=pytest.mark.slow)])
def test_a_nan_run_stops_naming_the_step_and_terms_and_saves_nothing_non_finite(engine, tiny_overrides, tmp_path):
    over = tiny_overrides + [
        "recipe=tide_shared",
        "train.lr=1e30",
        "train.steps=6",
        "train.save_every=1",
        "train.warmup_steps=0",
        "train.keep_last=0",
    ]
    over += [f"engine.ds_config={ZERO3}"] if engine == "deepspeed" else []
    with pytest.raises(
        NonFiniteError,
        match=r"step \d: non-finite (gradient norm|(loss|ce|tidal)(, (loss|ce|tidal))*) "
        r"\(train.nonfinite=stop\).*lower train.lr \(now 1e\+30\)",
    ):
        distill(load_config(None, over))
    saved = finite_checkpoints(tmp_path / "run" / "checkpoints")
    assert saved and all(saved.values()), saved
    assert not (tmp_path / "run" / "final").exists()


def test_skip_counts_non_finite_steps_and_keeps_the_weights_finite(tiny_overrides, tmp_path, monkeypatch, capsys):
    from tide_ds.pipeline import step as step_module

    real, calls = step_module.DistillStep.loss, []

    def nan_at_step_2(self, *args, **kwargs):
        loss, terms = real(self, *args, **kwargs)
        calls.append(1)
        return (loss * float("nan"), terms) if len(calls) == 2 else (loss, terms)

    monkeypatch.setattr(step_module.DistillStep, "loss", nan_at_step_2)
    result = distill(load_config(None, tiny_overrides + ["recipe=ce", "train.nonfinite=skip"]))
    log = capsys.readouterr().out
    assert "step 2: non-finite loss; optimizer step skipped (1 skipped, 1 in a row)" in log, log
    assert all(
        torch.isfinite(v).all()
        for v in AutoModelForCausalLM.from_pretrained(result["student_dir"]).state_dict().values()
    )
    with pytest.raises(NonFiniteError, match=r"for 2 optimizer steps in a row \(more than train.max_nonfinite=1\)"):
        distill(
            load_config(
                None,
                tiny_overrides
                + [
                    "recipe=ce",
                    "train.nonfinite=skip",
                    "train.max_nonfinite=1",
                    "train.lr=1e30",
                    "train.warmup_steps=0",
                    "train.steps=8",
                    "train.overwrite=true",  # the first run's checkpoints are in the same output_dir
                ],
            )
        )


# -- a full disk ----------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 400 KiB tmpfs: room for one tiny checkpoint (about 300 KiB), not two."""
    where = tmp_path / "disk"
    where.mkdir()
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=400k", f"tide{uuid.uuid4().hex[:6]}", str(where)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({out.stderr.strip()[:80]})")
    yield where
    subprocess.run(["umount", "--lazy", str(where)], check=True)  # a failed write may still hold its file


def test_a_full_disk_names_the_directory_and_keeps_the_earlier_checkpoint(tiny_overrides, small_disk):
    over = [o for o in tiny_overrides if not o.startswith("output_dir=")] + [
        f"output_dir={small_disk}",
        "recipe=ce",
        "train.steps=4",
        "train.save_every=2",
        "train.keep_last=0",
    ]
    with pytest.raises(ConfigError) as e:
        distill(load_config(None, over))
    root = small_disk / "checkpoints"
    assert re.fullmatch(
        rf"saving checkpoint step4 in {root} failed: No space left on device \([0-9.]+ MiB free "
        rf"there\); the previous checkpoint {root / 'step2'} is intact; .*",
        str(e.value),
    ), str(e.value)
    print(e.value)
    assert checkpoint.why_incomplete(str(root), "step2") is None and not (root / "step4.partial").exists()
    assert (root / "latest").read_text() == "step2"
    assert checkpoint.resolve_resume(load_config(None, over + ["train.resume=latest"])) == (str(root), "step2")


# -- bad input: one test per row of docs/faults.md --------------------------------------------------


def no_model_loads(monkeypatch):
    """Fails the test if a model is built: the error must come before."""
    import tide_ds.train as train

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(train, "build_student", refuse)
    monkeypatch.setattr(train, "build_teacher", refuse)


@pytest.mark.parametrize("side", ["teacher", "student"])
def test_data_prepared_for_other_tokenizers_stops_before_training(
    side, cross_data, tiny_assets, tiny_overrides, tmp_path, monkeypatch
):
    from tide_ds.data.corpus import train_tokenizer

    over = tiny_overrides + [
        "recipe=tide_cross",
        f"data.source={cross_data['prepared']}",
        f"teacher.path={cross_data['teacher']}",
    ]
    if side == "teacher":  # a teacher with the student's tokenizer, larger than the one the data was made for
        over.append(f"teacher.path={tiny_assets['teacher']}")
    else:
        train_tokenizer(tiny_assets["files"][:5], 300, str(tmp_path / "tok"))
        over.append(f"student.tokenizer={tmp_path / 'tok'}")
    no_model_loads(monkeypatch)
    with pytest.raises(
        ConfigError,
        match=rf"was prepared with the {side} tokenizer .* whose vocabulary differs "
        rf"from this run's {side} tokenizer; set {side}.tokenizer",
    ):
        distill(load_config(None, over))


def test_the_prepare_report_records_both_tokenizers(cross_data):
    report = json.loads(open(os.path.join(cross_data["prepared"], "prepare_report.json")).read())
    assert set(report["tokenizers"]) == {"student", "teacher"}
    assert report["tokenizers"]["student"] != report["tokenizers"]["teacher"]


def test_a_truncated_weights_file_is_named(tiny_assets, tiny_overrides, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_assets["teacher"], teacher)
    weights = teacher / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(
        ConfigError,
        match=rf"teacher.path={teacher}: a weights file is truncated or damaged .*; "
        rf"copy the model directory again",
    ):
        distill(load_config(None, tiny_overrides + ["recipe=kl", f"teacher.path={teacher}"]))


@pytest.fixture
def saved_run(tiny_overrides, tmp_path):
    """A finished 2-step run with its checkpoint step2, and the overrides that made it."""
    over = tiny_overrides + ["recipe=ce", "train.steps=2"]
    distill(load_config(None, over))
    return over, tmp_path / "run" / "checkpoints"


def test_a_truncated_checkpoint_shard_is_skipped_and_named(saved_run):
    over, root = saved_run
    shard = root / "step2" / "plain_state.pt"
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(
        ConfigError,
        match=r"checkpoint .*step2 is damaged \(file plain_state.pt has \d+ bytes, "
        r"\d+ when saved\); no complete checkpoint in",
    ):
        distill(load_config(None, over + [f"train.resume={root / 'step2'}"]))


def test_a_corrupt_checkpoint_shard_is_named(saved_run):
    over, root = saved_run
    shard = root / "step2" / "plain_state.pt"
    data = bytearray(shard.read_bytes())
    data[:64] = b"\0" * 64  # the same size, damaged contents
    shard.write_bytes(bytes(data))
    marker = json.loads((root / "step2" / checkpoint.MARKER).read_text())
    del marker["checksums"]  # a marker of an older layout: the damage is found when the file is read
    (root / "step2" / checkpoint.MARKER).write_text(json.dumps(marker))
    with pytest.raises(
        ConfigError,
        match=r"train.resume: checkpoint .*step2 cannot be read \(.*\); it is damaged: "
        r"resume from an earlier checkpoint",
    ):
        distill(load_config(None, over + ["train.resume=latest"]))


def test_resume_with_another_world_size_is_refused(saved_run):
    over, root = saved_run
    marker = json.loads((root / "step2" / checkpoint.MARKER).read_text())
    (root / "step2" / checkpoint.MARKER).write_text(json.dumps({**marker, "world": 2}))  # as if saved by 2 ranks
    with pytest.raises(ConfigError, match=r"step2 was saved by 2 ranks, this run has 1; resume with 2 ranks"):
        distill(load_config(None, over + ["train.resume=latest"]))


def test_resume_with_another_architecture_is_refused(saved_run):
    over, root = saved_run
    over = [o.replace("hidden_size: 32", "hidden_size: 48") for o in over]
    with pytest.raises(ConfigError, match=r"holds another student architecture than this run builds"):
        distill(load_config(None, over + ["train.resume=latest"]))


def test_seq_len_zero(tiny_overrides):
    with pytest.raises(ConfigError, match=r"data.seq_len must be >= 1 \(got 0\)"):
        load_config(None, tiny_overrides + ["data.seq_len=0"])


def test_prepare_on_a_directory_that_is_not_a_dataset(tiny_assets, tmp_path):
    from tide_ds.data.prepare import PrepareConfig, SideConfig, prepare

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    side = SideConfig(tokenizer=tiny_assets["tokenizer"], max_length=64)
    with pytest.raises(ConfigError, match=r"notes is a directory but not a saved dataset"):
        prepare(
            PrepareConfig(
                data_files=[str(tmp_path / "notes")], output_dir=str(tmp_path / "out"), student=side, teacher=side
            )
        )


def test_export_onto_an_existing_file(saved_run, tmp_path):
    _, root = saved_run
    (tmp_path / "model.bin").write_text("x")
    with pytest.raises(ConfigError, match=r"export: .*model.bin is an existing file; give a directory path"):
        checkpoint.export(str(root), str(tmp_path / "model.bin"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["train.micro_batch_size=20000"], r"the global batch \(20000\) is larger than the training set \(\d+ rows\)"),
        (["train.global_batch_size=3"], r"the global batch \(3\) must be a multiple of micro batch \(2\)"),
        ([f"engine.ds_config={ZERO3}", "train.nonfinite=skip"], r"train.nonfinite=skip is for single-process runs"),
    ],
)
def test_batch_arithmetic_stops_before_any_model_loads(extra, message, tiny_overrides, monkeypatch):
    no_model_loads(monkeypatch)
    with pytest.raises(ConfigError, match=message):
        distill(load_config(None, tiny_overrides + ["recipe=ce", *extra]))
