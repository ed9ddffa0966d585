"""Outputs never overwritten or half-written, resumes that check what matters, and the command
line's remaining bad inputs: each case of docs/faults.md's table that these cover, one test each."""

import errno
import json
import os
import re
import shlex
import shutil
import subprocess

import pytest
import transformers
from test_engine import BIN
from test_faults import cli, finish
from test_generate_cli import ar_checkpoint

from tide_ds.cli import main
from tide_ds.config import ConfigError, load_config
from tide_ds.train import distill


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


# -- outputs: never overwritten without --overwrite, never half-written ----------------------------


@pytest.fixture
def saved_run(tiny_overrides, tmp_path):
    """A finished 2-step run (checkpoint step2 and final/), and the overrides that made it."""
    over = tiny_overrides + ["recipe=ce", "train.steps=2"]
    distill(load_config(None, over))
    return over, tmp_path / "run"


def full_disk(monkeypatch):
    """Every model save writes part of its weights, then finds the disk full."""

    def save_pretrained(self, path, *args, **kwargs):
        with open(os.path.join(path, "model.safetensors"), "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save_pretrained)


def contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def a2d(ar, out, *extra):
    return main(["a2d", "--model", ar, "--out", str(out), "--block-size", "4", "--dtype", "float32", *extra])


def export(root, out, *extra):
    return main(["export", str(root), str(out), *extra])


@pytest.mark.parametrize("command", ["export", "a2d"])
def test_a_non_empty_output_directory_needs_overwrite(command, saved_run, tmp_path, capsys):
    _, run = saved_run
    ar = ar_checkpoint(tmp_path / "ar") if command == "a2d" else None

    def write(out, *extra):
        return export(run / "checkpoints", out, *extra) if command == "export" else a2d(ar, out, *extra)

    out = tmp_path / "teacher"
    out.mkdir()
    (out / "config.json").write_text("{}")  # somebody's model
    capsys.readouterr()
    assert write(out) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "error" in line] == [
        f"tide-ds {command}: error: {'export' if command == 'export' else '--out'}: {out} is not empty; give a new "
        f"directory, or add --overwrite to replace its contents"
    ], err
    assert contents(out) == {"config.json": b"{}"}
    assert write(out, "--overwrite") == 0
    assert "model.safetensors" in contents(out) and (out / "config.json").read_text() != "{}"
    assert not list(tmp_path.glob("teacher.*"))  # no .partial or .old left behind


@pytest.mark.parametrize("command", ["export", "a2d", "final"])
def test_a_full_disk_leaves_the_earlier_contents_and_says_so(command, saved_run, tmp_path, monkeypatch, capsys):
    over, run = saved_run
    out = run / "final" if command == "final" else tmp_path / "model"
    ar = ar_checkpoint(tmp_path / "ar") if command == "a2d" else None
    if command != "final":  # an earlier model in place
        assert (export(run / "checkpoints", out) if command == "export" else a2d(ar, out)) == 0
    before = contents(out)
    full_disk(monkeypatch)
    capsys.readouterr()
    if command == "final":  # a resumed run that goes on to step 3 writes final/ again
        with pytest.raises(ConfigError) as e:
            distill(load_config(None, [*over, "train.steps=3", "train.resume=latest"]))
        err = f"tide-ds distill: error: {e.value}"
    else:
        assert (
            export(run / "checkpoints", out, "--overwrite") if command == "export" else a2d(ar, out, "--overwrite")
        ) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"tide-ds {'distill' if command == 'final' else command}: error: writing {out.name} in {out.parent} failed: "
        rf"No space left on device \([0-9.]+ MiB free there\); {out} is as it was; free space there, or write "
        rf"to a larger disk",
        err,
    ), err
    assert contents(out) == before
    assert not (out.parent / f"{out.name}.partial").exists()


# -- resumes check what matters ---------------------------------------------------------------------


def zero_64_bytes(file):
    data = bytearray(file.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = b"\0" * 64  # inside a tensor's bytes; the size is unchanged
    file.write_bytes(bytes(data))


def test_a_corrupt_tensor_file_is_refused_by_its_checksum_and_latest_skips_it(tiny_overrides, tmp_path, capsys):
    over = tiny_overrides + ["recipe=ce", "train.steps=2", "train.save_every=1", "train.keep_last=0"]
    distill(load_config(None, over))
    root = tmp_path / "run" / "checkpoints"
    zero_64_bytes(root / "step2" / "plain_state.pt")
    with pytest.raises(ConfigError) as e:
        distill(load_config(None, over + [f"train.resume={root / 'step2'}"]))
    assert str(e.value) == (
        f"train.resume: checkpoint {root / 'step2'} is damaged (file plain_state.pt does not match its checksum: "
        f"its contents changed after the save); resume from {root / 'step1'}"
    )
    capsys.readouterr()
    resumed = distill(load_config(None, over + ["train.resume=latest", "train.steps=3"]))
    log = capsys.readouterr().out
    assert f"resume: skipping checkpoint {root / 'step2'} (damaged (file plain_state.pt does not match" in log, log
    assert f"resume: from {root / 'step1'}" in log and resumed["first_step"] == 1


@pytest.mark.parametrize(
    "change, key, saved, new",
    [
        ("diffusion.block_size=16", "diffusion.block_size", 8, 16),
        ("diffusion.mask_token=<|endoftext|>", "the mask token id (diffusion.mask_token)", None, None),
        ("student.tokenizer=SMALLER", "the student's vocabulary size (student.tokenizer)", None, None),
    ],
)
def test_resume_with_other_block_vocabulary_or_mask_token_is_refused(
    change, key, saved, new, saved_run, tiny_assets, tmp_path
):
    from tide_ds.data.corpus import train_tokenizer

    over, run = saved_run
    if "SMALLER" in change:
        train_tokenizer(tiny_assets["files"][:5], 300, str(tmp_path / "tok"))
        change = f"student.tokenizer={tmp_path / 'tok'}"
    with pytest.raises(ConfigError) as e:
        distill(load_config(None, over + [change, "train.resume=latest"]))
    m = re.fullmatch(
        rf"train.resume: {run / 'checkpoints' / 'step2'} was saved with {re.escape(key)} = (\S+), this run has "
        rf"(\S+); set it as when saved, or start a new run from an export of it \(tide-ds export\)",
        str(e.value),
    )
    assert m, str(e.value)
    if saved is not None:
        assert (int(m.group(1)), int(m.group(2))) == (saved, new)
    else:
        assert m.group(1) != m.group(2)


# -- eval checks the data's tokenizers as distill does ------------------------------------------------


def test_eval_checks_the_data_tokenizers(saved_run, cross_data, tiny_assets, tmp_path, capsys):
    _, run = saved_run
    data = cross_data["prepared"]
    nll = ["eval", "--tasks", "nll", "--data", data, "--batches", "1", "--ratios", "0.5"]
    assert main([*nll, "--model", str(run / "final")]) == 0  # the student's tokenizer, with its mask token
    a2d(ar_checkpoint(tmp_path / "ar"), tmp_path / "other")  # a student on another tokenizer
    capsys.readouterr()
    assert main([*nll, "--model", str(tmp_path / "other")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"tide-ds eval: error: --data={data} was prepared with the student tokenizer "
        f"{tiny_assets['tokenizer']}, whose vocabulary differs from this run's student tokenizer; give a "
        f"student trained on it as --model, or prepare the data again with this student's tokenizer"
    )
    agreement = ["eval", "--tasks", "agreement", "--data", data, "--model", str(run / "final")]
    assert main([*agreement, "--teacher", tiny_assets["teacher"], "--batches", "1"]) == 2
    assert "prepared with the teacher tokenizer" in capsys.readouterr().err


# -- truncated prepared data, output file paths ---------------------------------------------------------


@pytest.mark.parametrize("damage", ["arrow", "report"])
def test_truncated_prepared_data_is_named(damage, cross_data, tiny_overrides, tmp_path):
    data = tmp_path / "prepared"
    shutil.copytree(cross_data["prepared"], data)
    file = next(data.glob("*.arrow")) if damage == "arrow" else data / "prepare_report.json"
    os.truncate(file, file.stat().st_size // 2)
    over = tiny_overrides + ["recipe=tide_cross", f"data.source={data}", f"teacher.path={cross_data['teacher']}"]
    with pytest.raises(ConfigError) as e:
        distill(load_config(None, over))
    what = f"{data} holds a truncated or damaged dataset file" if damage == "arrow" else f"{file} is truncated"
    assert str(e.value).startswith(what) and str(e.value).endswith(
        "; run `tide-ds prepare` for it again" if damage == "arrow" else f"; run `tide-ds prepare` for {data} again"
    ), e.value


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_an_output_file_that_is_a_directory_is_refused_before_any_work(command, tmp_path, capsys, monkeypatch):
    import tide_ds.eval.cli as eval_cli

    monkeypatch.setattr(eval_cli, "evaluate", lambda *a, **k: pytest.fail("the work started"))
    flag = "--out" if command == "eval" else "--csv"
    argv = ["eval", "--model", str(tmp_path), "--tasks", "nll"] if command == "eval" else ["bench", "kernel"]
    for path, message in [
        (tmp_path, f"{flag} {tmp_path} is a directory; give a file path"),
        (
            tmp_path / "no" / "x.json",
            f"{flag} {tmp_path / 'no' / 'x.json'}: the folder {tmp_path / 'no'} does not exist",
        ),
    ]:
        assert main([*argv, flag, str(path)]) == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_write_dir_replaces_whole_and_puts_back_contents_a_cut_short_write_left_aside(tmp_path):
    from tide_ds.outputs import write_dir

    out = tmp_path / "model"
    write_dir(str(out), lambda tmp: open(os.path.join(tmp, "a"), "w").write("1"))
    assert sorted(os.listdir(out)) == ["a"] and not os.path.exists(f"{out}.partial")

    def fails(tmp):
        open(os.path.join(tmp, "b"), "w").write("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ConfigError, match=r"writing model in .* failed: No space left on device .*model is as it was"):
        write_dir(str(out), fails)
    assert sorted(os.listdir(out)) == ["a"] and not os.path.exists(f"{out}.partial")

    os.rename(out, f"{out}.old")  # a kill between the two renames: only <out>.old is left
    with pytest.raises(ConfigError):
        write_dir(str(out), fails)
    assert sorted(os.listdir(out)) == ["a"], "the earlier contents were put back, not deleted"
