"""tools/gpu_check.py's CPU-runnable parts: the wheelhouse check, the arguments, the step runner and
the report (CI also runs the whole check with --cpu, .ci/run)."""

import json
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import gpu_check  # noqa: E402


def _wheel(dest: Path, name: str, members=("x.py",)) -> Path:
    path = dest / name
    with zipfile.ZipFile(path, "w") as z:
        for m in members:
            z.writestr(m, "")
    return path


def _good_wheelhouse(dest: Path) -> Path:
    dest.mkdir()
    _wheel(dest, "tide_ds-0.1.0-py3-none-any.whl", ["tide_ds/kernels/csrc/tide_kernels.cu"])
    for req in gpu_check.BUILT + gpu_check.DOWNLOADED:
        name, version = req.split("==")
        _wheel(dest, f"{name.replace('-', '_')}-{version}-cp312-cp312-manylinux_2_17_x86_64.whl")
    return dest


def test_a_complete_wheelhouse_for_the_gpu_python_passes(tmp_path):
    assert gpu_check.check_wheelhouse(_good_wheelhouse(tmp_path / "w")) == []


def test_the_wheelhouse_check_names_each_problem(tmp_path):
    w = _good_wheelhouse(tmp_path / "w")
    next(w.glob("deepspeed-*")).unlink()
    next(w.glob("msgpack-*")).rename(w / "msgpack-1.1.2-cp311-cp311-manylinux_2_17_x86_64.whl")
    next(w.glob("psutil-*")).rename(w / "psutil-7.2.2-cp312-cp312-macosx_11_0_arm64.whl")
    _wheel(w, "tide_ds-0.1.0-py3-none-any.whl", ["tide_ds/__init__.py"])  # no kernel sources
    problems = gpu_check.check_wheelhouse(w)
    assert f"{w}: no wheel of deepspeed" in problems
    assert "msgpack-1.1.2-cp311-cp311-manylinux_2_17_x86_64.whl: not for Python 3.12" in problems
    assert "psutil-7.2.2-cp312-cp312-macosx_11_0_arm64.whl: not for x86_64 Linux" in problems
    assert "tide_ds-0.1.0-py3-none-any.whl carries no kernel sources" in problems
    assert len(problems) == 4, problems


def test_check_refuses_a_used_out_directory_and_a_missing_wheelhouse(tmp_path, capsys):
    used = tmp_path / "used"
    used.mkdir()
    (used / "report.md").write_text("an earlier report")
    with pytest.raises(SystemExit, match="--out .*used is not empty; name a new directory"):
        gpu_check.main(["check", "--out", str(used), "--wheelhouse", str(_good_wheelhouse(tmp_path / "w"))])
    with pytest.raises(SystemExit, match="no wheelhouse at .*nowhere: make gpu-wheelhouse"):
        gpu_check.main(["check", "--out", str(tmp_path / "new"), "--wheelhouse", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="--budget-s must be > 0"):
        gpu_check.main(["check", "--out", str(tmp_path / "new"), "--budget-s", "0"])
    assert (used / "report.md").read_text() == "an earlier report" and not (tmp_path / "new").exists()


def test_steps_log_each_command_skip_past_the_budget_and_the_report_shows_them(tmp_path):
    steps = gpu_check.Steps(tmp_path, budget_s=60, env={})
    assert steps.run("ok", [sys.executable, "-c", "print('figure 1.23x')"], 30) == 0
    assert steps.run("bad", [sys.executable, "-c", "raise SystemExit(3)"], 30) == 3
    assert steps.run("slow", [sys.executable, "-c", "import time; time.sleep(5)"], 1) == 124
    steps.budget_s = 0  # the budget spent: later steps are skipped and say so
    assert steps.run("late", [sys.executable, "-c", "pass"], 30) is None
    assert [(r["step"], r["status"]) for r in steps.rows] == [
        ("ok", "passed"),
        ("bad", "failed"),
        ("slow", "timed out"),
        ("late", "skipped"),
    ]
    gpu_check.write_report(tmp_path, dict(mode="cpu", seconds=1.0, steps=steps.rows, gpu_tests={"tests": 2}))
    md = (tmp_path / "report.md").read_text()
    assert "| bad | failed  |" in md and "| late | skipped " in md and "figure 1.23x" in md
    assert json.loads((tmp_path / "report.json").read_text())["steps"][0]["log"] == "ok.log"
