"""Teacher targets: `tide-ds teach` once, then `tide-ds distill teacher.targets=DIR` with no teacher,
bitwise equal to the online run (CPU, fp32); refusals; resuming a killed `teach`."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_engine import ZERO3, launch
from transformers import AutoModelForCausalLM

import tide_ds
from tide_ds.config import ConfigError, load_config
from tide_ds.pipeline.targets import TargetsReader
from tide_ds.teach import teach
from tide_ds.train import distill

REPO = Path(tide_ds.__file__).resolve().parent.parent


def run_overrides(tiny_overrides, cross_data, recipe, steps=5):
    return tiny_overrides + [
        f"recipe={recipe}",
        f"data.source={cross_data['prepared']}",
        f"teacher.path={cross_data['teacher']}",
        f"train.steps={steps}",
        "train.warmup_steps=0",
        "train.lr=3e-3",
    ]


def from_targets(over, directory, out) -> list[str]:
    """The same run reading `directory`, with no teacher checkpoint at all."""
    return over + [f"output_dir={out}", "teacher.path=null", f"teacher.targets={directory}"]


def same_run(a: dict, b: dict, term: str) -> None:
    """Every logged value (losses, terms, gradient norm) and every final weight, bitwise."""
    keys = [k for k in a["history"][0] if k not in ("time", "tokens_per_s", "overlap_fraction")]
    assert term in keys and any(h[term] != 0 for h in a["history"])  # the teacher's term is live
    assert [[h[k] for k in keys] for h in a["history"]] == [[h[k] for k in keys] for h in b["history"]]
    assert a["heldout_loss_after"] == b["heldout_loss_after"]
    wa = AutoModelForCausalLM.from_pretrained(a["student_dir"]).state_dict()
    wb = AutoModelForCausalLM.from_pretrained(b["student_dir"]).state_dict()
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


TERM = {"tide_cross": "reverse_calm", "tide_shared": "tidal"}


@pytest.mark.parametrize("recipe", ["tide_cross", "tide_shared"])  # CompDemo off, on (chunk TIDAL)
def test_distill_from_targets_equals_the_online_run_bitwise(recipe, tiny_overrides, cross_data, tmp_path):
    over = run_overrides(tiny_overrides, cross_data, recipe)
    online = distill(load_config(None, over + [f"output_dir={tmp_path / 'online'}"]))
    summary = teach(load_config(None, over), str(tmp_path / "targets"), shard_steps=2)
    assert summary["shards"] == 3 and summary["computed"] == 3 and summary["rows"] == 5 * 2
    # teacher.path=null: a run that built or loaded a teacher would stop
    offline = distill(load_config(None, from_targets(over, tmp_path / "targets", tmp_path / "offline")))
    same_run(online, offline, TERM[recipe])


@pytest.fixture
def calm_targets(tiny_overrides, cross_data, tmp_path):
    """Targets of a short calm run, and its overrides."""
    over = run_overrides(tiny_overrides, cross_data, "calm", steps=3)
    teach(load_config(None, over), str(tmp_path / "targets"))
    return over, tmp_path / "targets"


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("train.seed=1", "train.seed: 0 there, 1 here"),
        ("train.steps=4", "train.steps: 3 there, 4 here"),
        ("diffusion.eps=0.01", "diffusion.eps: 0.001 there, 0.01 here"),
        ("recipe=tide_shared", "CompDemo: False there, True here"),
    ],
)
def test_a_targets_directory_of_another_run_is_refused_naming_the_key(change, named, calm_targets, tmp_path):
    over, directory = calm_targets
    cfg = load_config(None, from_targets(over, directory, tmp_path / "run") + [change])
    with pytest.raises(ConfigError) as e:
        distill(cfg)
    message = str(e.value)
    assert (
        "\n" not in message
        and named in message
        and f"teacher.targets={directory} was written for another run" in message
    )


def test_another_teacher_checkpoint_is_refused(calm_targets, cross_data, tmp_path):
    """With teacher.path set, its checkpoint's hash is compared too."""
    over, directory = calm_targets
    other = tmp_path / "teacher"
    shutil.copytree(cross_data["teacher"], other)  # its tokenizer too
    model = AutoModelForCausalLM.from_pretrained(other)
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    model.save_pretrained(other)
    cfg = load_config(
        None,
        from_targets(over, directory, tmp_path / "run")[:-2]
        + [f"teacher.path={other}", f"teacher.targets={directory}"],
    )
    with pytest.raises(ConfigError, match=r"was written for another run \(teacher\.path: '"):
        distill(cfg)


def test_terms_that_need_whole_distributions_are_refused(tiny_overrides, tmp_path):
    """KL, reverse KL and token TIDAL need the teacher's distributions, which targets do not hold."""
    for recipe, term in [("kl", "kl"), ("reverse_kl", "reverse_kl"), ("tide_shared", "tidal")]:
        with pytest.raises(ConfigError, match=f"recipe '{recipe}' uses {term}, which needs the teacher's whole"):
            teach(load_config(None, tiny_overrides + [f"recipe={recipe}"]), str(tmp_path / "t"))
    with pytest.raises(ConfigError, match="recipe 'ce' needs no teacher"):
        teach(load_config(None, tiny_overrides + ["recipe=ce"]), str(tmp_path / "t"))


def test_an_incomplete_targets_directory_is_refused(calm_targets, tmp_path):
    over, directory = calm_targets
    manifest = json.loads((directory / "manifest.json").read_text())
    half = tmp_path / "half"
    half.mkdir()
    (half / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(ConfigError, match="is incomplete .* run the same `tide-ds teach` command again"):
        distill(load_config(None, from_targets(over, half, tmp_path / "run")))


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def shard_times(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.glob("shard-*.pt")}


@pytest.mark.slow
def test_teach_killed_mid_run_continues_without_recomputing_finished_shards(tiny_overrides, cross_data, tmp_path):
    over = run_overrides(tiny_overrides, cross_data, "tide_cross", steps=100)
    out = tmp_path / "targets"
    cmd = [sys.executable, "-m", "tide_ds.cli", "teach", "--out", str(out), "--shard-steps", "1", *over]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(shard_times(out) if out.is_dir() else {}) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = shard_times(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and 5 <= len(before) < 100, len(before)  # killed mid-run
    resumed = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{len(before)} of 100 shards there" in resumed.stdout
    assert f"({100 - len(before)} shards computed here" in resumed.stdout
    after = shard_times(out)
    assert len(after) == 100 and all(after[name] == t for name, t in before.items())  # none rewritten
    assert not list(out.glob("*.tmp*")) and json.loads((out / "manifest.json").read_text())["complete"]
    # the same values as an uninterrupted run's
    whole = tmp_path / "whole"
    assert subprocess.run([*cmd[:5], str(whole), *cmd[6:]], env=_env(), capture_output=True).returncode == 0
    for name in after:
        a, b = torch.load(out / name), torch.load(whole / name)
        assert torch.equal(a["values"], b["values"]) and torch.equal(a["offsets"], b["offsets"])


@pytest.mark.multirank
@pytest.mark.slow
# tide_shared only: its CompDemo passes cover tide_cross's single pass (both recipes run on 1 process above)
@pytest.mark.parametrize("recipe", ["tide_shared"])
def test_on_2_ranks_targets_from_one_rank_equal_the_online_run_bitwise(recipe, tiny_overrides, cross_data, tmp_path):
    """teach on one process (2 accumulation steps), distill on 2 ranks online and from the targets."""
    over = run_overrides(tiny_overrides, cross_data, recipe, steps=4)
    teach(load_config(None, over + ["train.gradient_accumulation_steps=2"]), str(tmp_path / "targets"))
    runs = {}
    for name, args in [
        ("online", over + [f"output_dir={tmp_path / 'online'}"]),
        ("offline", from_targets(over, tmp_path / "targets", tmp_path / "offline")),
    ]:
        out, _ = launch("torchrun", args)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        runs[name] = json.loads(
            Path(args[-3 if name == "offline" else -1].split("=", 1)[1], "metrics.json").read_text()
        )
    assert runs["online"]["world"] == 2
    same_run(runs["online"], runs["offline"], TERM[recipe])


@pytest.mark.multirank
@pytest.mark.slow
def test_teach_on_2_ranks_with_a_zero3_teacher_writes_the_one_process_values(tiny_overrides, cross_data, tmp_path):
    """Each rank writes its own global-batch positions; a ZeRO-3 teacher gathers its weights for
    every call, so the values equal a whole teacher's (one process, 2 accumulation steps) to rounding."""
    over = run_overrides(tiny_overrides, cross_data, "tide_cross", steps=3)
    teach(load_config(None, over + ["train.gradient_accumulation_steps=2"]), str(tmp_path / "one"))
    sharded = over + [f"engine.ds_config={ZERO3}", "engine.teacher_placement=zero3"]
    out, _ = launch("torchrun", ["--out", str(tmp_path / "two"), *sharded], command="teach")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    one, two = TargetsReader(str(tmp_path / "one")), TargetsReader(str(tmp_path / "two"))
    assert {r.start for s in two.shards.values() for r in s} == {0, 2}  # each rank its own positions
    rows = [(one.row(s, p), two.row(s, p)) for s in range(3) for p in range(4)]
    assert sum(a.numel() for a, _ in rows) > 0
    for a, b in rows:
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_bench_targets_prints_both_runs_and_a_projection_from_the_targets_it_wrote(
    tiny_overrides, cross_data, tmp_path
):
    over = [o for o in run_overrides(tiny_overrides, cross_data, "tide_cross", steps=3) if "output_dir" not in o]
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "tide_ds.cli", "bench", "targets", "--work", str(work), "--project-rows", "1000"]
    out = subprocess.run(cmd + ["--project-epochs", "2", "--project-length", "64", "--", *over],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert any(ln.startswith("online ") for ln in lines) and any(ln.startswith("targets ") for ln in lines)
    assert any(ln.startswith("targets / online: time ") for ln in lines)
    # the projection from the shards themselves: 8 offset bytes + 4 per active chunk, scaled to 64 tokens a row
    values = rows = 0
    for shard in (work / "targets").glob("shard-*.pt"):
        s = torch.load(shard, weights_only=True)
        values, rows = values + s["values"].numel(), rows + s["offsets"].numel() - 1
    length = json.loads((Path(cross_data["prepared"]) / "prepare_report.json").read_text())["config"]["student"]
    per_row = 8 + 4 * values / rows / length["max_length"] * 64
    (projected,) = [ln for ln in lines if ln.startswith("projected: ")]
    assert f"{per_row:.0f} bytes a row, {per_row * 1000 * 2 / 2**30:.2f} GiB" in projected


def test_bench_targets_refuses_a_used_work_directory_before_any_run(tmp_path):
    (tmp_path / "old").write_text("x")
    cmd = [sys.executable, "-m", "tide_ds.cli", "bench", "targets", "--work", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and f"--work {tmp_path} is not empty" in out.stderr
