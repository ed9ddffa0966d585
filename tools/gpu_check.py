"""The prepared check of a GPU machine, in one command and under 8 minutes.

  python tools/gpu_check.py wheelhouse DIR     (here, with the package registry: what the GPU machine lacks)
  python tools/gpu_check.py check --out DIR    (on the GPU machine: no internet, no DeepSpeed)
  python tools/gpu_check.py check --out DIR --cpu   (the same steps at CPU sizes, without the GPU-only ones)

`check` makes a venv over the machine's own packages (its CUDA torch, transformers, pytest), installs
the wheelhouse into it without the network, builds the CUDA extension, runs `pytest -m gpu` and
`tide-ds bench kernel|step|schedule` at the GPU target sizes, and writes every step's log and a report
(report.md, report.json) into --out. Steps that would run past the time budget are skipped, and say
so. `--cpu` is what CI runs, so that the wheelhouse, the arguments and the report cannot rot.
Standard library only: it runs before tide_ds and its dependencies are installed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The GPU machine: Python 3.12 with CUDA torch, transformers, triton and pytest, and no DeepSpeed.
# What tide_ds and its GPU tests import beyond those, pinned (datasets is imported only by
# `tide-ds prepare`, which the check does not run).
GPU_PYTHON = "3.12"
BUILT = ["deepspeed==0.19.8"]  # sdists: built into wheels here
DOWNLOADED = [
    "hjson==3.1.0",
    "msgpack==1.1.2",
    "ninja==1.13.0",
    "py-cpuinfo==9.0.0",
    "psutil==7.2.2",
    "einops==0.8.2",
    "pydantic==2.13.4",
    "pydantic-core==2.50.5",
    "annotated-types==0.7.0",
    "typing-inspection==0.4.4",
    "hypothesis==6.152.1",
    "sortedcontainers==2.4.0",
]
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
MAX_BYTES = 64 * 2**20  # what the device tool carries with the tree
GPU_SIZES = {
    "kernel": [],  # its GPU defaults are the target sizes (4096 tokens, H 1024, V 151936, bf16)
    "step": ["--batch", "8", "--length", "512", "--hidden", "1024", "--vocab", "151936", "--layers", "2"],
    "schedule": ["--batch", "8", "--length", "512", "--hidden", "1024", "--vocab", "151936", "--steps", "4"],
}
CPU_SIZES = {
    "kernel": ["--n", "64", "--h", "32", "--v", "512", "--repeats", "1", "--variants", "fused"],
    "step": "--batch 2 --length 32 --hidden 32 --vocab 512 --layers 1 --repeats 1 --variants auto".split(),
    "schedule": ["--batch", "2", "--length", "32", "--hidden", "32", "--vocab", "512", "--steps", "1", "--warmup", "0"],
}


def platform_args() -> list[str]:
    return [a for p in PLATFORMS for a in ("--platform", p)]


def fail(message: str) -> None:
    sys.exit(f"gpu_check: error: {message}")


# -- the wheelhouse (made here) --------------------------------------------------------------------


def wheelhouse(dest: Path) -> None:
    if dest.exists() and any(dest.iterdir()):
        fail(f"{dest} is not empty; remove it or name another directory")
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "-q"]
    tags = ["--python-version", GPU_PYTHON, "--implementation", "cp", "--only-binary", ":all:", *platform_args()]
    for cmd in (
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dest), str(REPO)],
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dest), *BUILT],
        [*pip, "download", "--no-deps", "-d", str(dest), *tags, *DOWNLOADED],
    ):
        if subprocess.run(cmd).returncode != 0:
            fail(f"{' '.join(cmd[3:5])} failed (see pip's output above)")
    problems = check_wheelhouse(dest)
    if problems:
        fail("; ".join(problems))
    size = sum(p.stat().st_size for p in dest.glob("*.whl"))
    print(f"{len(list(dest.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in {dest}")


def check_wheelhouse(dest: Path) -> list[str]:
    """What would stop the install on the GPU machine: a missing wheel, a wheel for another Python or
    platform, a package carrying no kernel sources, more bytes than the tree may carry."""
    wheels = sorted(dest.glob("*.whl"))
    names = {w.name.split("-")[0].lower().replace("_", "-") for w in wheels}
    wanted = {"tide-ds", *(r.split("==")[0] for r in BUILT + DOWNLOADED)}
    problems = [f"{dest}: no wheel of {n}" for n in sorted(wanted - names)]
    cp = "cp" + GPU_PYTHON.replace(".", "")
    for w in wheels:
        python, abi, platform = w.name[:-4].split("-")[-3:]
        if not (python in ("py3", "py2.py3", cp) or (abi == "abi3" and python.startswith("cp3"))):
            problems.append(f"{w.name}: not for Python {GPU_PYTHON}")
        if platform != "any" and "x86_64" not in platform:
            problems.append(f"{w.name}: not for x86_64 Linux")
    ours = [w for w in wheels if w.name.startswith("tide_ds-")]
    if ours and not any(n.endswith("tide_kernels.cu") for n in zipfile.ZipFile(ours[0]).namelist()):
        problems.append(f"{ours[0].name} carries no kernel sources")
    size = sum(w.stat().st_size for w in wheels)
    if size > MAX_BYTES:
        problems.append(f"{dest}: {size / 2**20:.0f} MiB, over the {MAX_BYTES // 2**20} MiB the tree may carry")
    return problems


# -- the check (on the GPU machine) ----------------------------------------------------------------


class Steps:
    """Runs commands one after another, each with its own log and timeout, within one time budget."""

    def __init__(self, out: Path, budget_s: float, env: dict):
        self.out, self.budget_s, self.env, self.start, self.rows = out, budget_s, env, time.time(), []

    def run(self, name: str, cmd: list[str], timeout_s: float, expect=(0,)) -> int | None:
        left = self.budget_s - (time.time() - self.start)
        if left < min(timeout_s, 30):
            self.rows.append(dict(step=name, status="skipped", why=f"{left:.0f} s of the budget left", seconds=0))
            return None
        log = self.out / f"{name}.log"
        t0 = time.time()
        with log.open("w") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            try:
                rc = subprocess.run(
                    cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, cwd=REPO, timeout=min(timeout_s, left)
                ).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        seconds = time.time() - t0
        status = "passed" if rc in expect else "timed out" if rc == 124 else "failed"
        self.rows.append(dict(step=name, status=status, rc=rc, seconds=round(seconds, 1), log=log.name))
        print(f"[{time.time() - self.start:5.0f} s] {name}: {status} ({seconds:.0f} s)", flush=True)
        return rc


def make_venv(steps: Steps, out: Path, wheels: Path) -> str | None:
    """A venv over the machine's packages with the wheelhouse installed into it; its python."""
    venv = out / "venv"
    # --without-pip: the system's pip (seen through the system site) installs into the venv, and
    # Debian's Python has no ensurepip without its python3-venv package
    if steps.run("venv", [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], 60) != 0:
        return None
    python = str(venv / "bin" / "python")
    install = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *map(str, sorted(wheels.glob("*.whl")))]
    if steps.run("install", install, 180) != 0:
        return None
    return python


def pytest_counts(xml: Path) -> dict:
    if not xml.exists():
        return {}
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def check(out: Path, wheels: Path, cpu: bool, budget_s: float) -> int:
    if out.exists() and any(out.iterdir()):
        fail(f"--out {out} is not empty; name a new directory")
    problems = check_wheelhouse(wheels) if wheels.is_dir() else [f"no wheelhouse at {wheels}: make gpu-wheelhouse"]
    if problems:
        fail("; ".join(problems))
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCH_EXTENSIONS_DIR": str(out / "torch_extensions")}
    steps = Steps(out, budget_s, env)
    probe = "import torch, sys; print(torch.__version__, torch.version.cuda, torch.cuda.is_available()); "
    probe += "print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
    if cpu:
        # CI: this Python is not the GPU machine's, so the install is a dry run for its tags
        tags = ["--python-version", GPU_PYTHON, "--only-binary", ":all:", "--target", str(out / "target")]
        tags += platform_args()
        dry = [sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--no-index", "--no-deps", *tags]
        steps.run("install", [*dry, *map(str, sorted(wheels.glob("*.whl")))], 120)
        python = sys.executable
    else:
        python = make_venv(steps, out, wheels)
    if python is not None:
        steps.run("environment", [python, "-c", probe], 60)
        if not cpu:
            build = "from tide_ds.kernels._ext import cuda_extension; import sys; sys.exit(cuda_extension() is None)"
            steps.run("extension", [python, "-W", "always", "-c", build], 300)
        xml = out / "gpu-tests.xml"
        # without a GPU every selected test skips (exit 0); on one, none selected (exit 5) is a failure
        steps.run("pytest-gpu", [python, "-m", "pytest", "-q", "-m", "gpu", "tests", f"--junitxml={xml}"], 300)
        device = ["--device", "cpu" if cpu else "cuda"]
        for bench, sizes in (CPU_SIZES if cpu else GPU_SIZES).items():
            steps.run(f"bench-{bench}", [python, "-m", "tide_ds.cli", "bench", bench, *device, *sizes], 120)
    report = dict(
        mode="cpu" if cpu else "gpu",
        seconds=round(time.time() - steps.start, 1),
        steps=steps.rows,
        gpu_tests=pytest_counts(out / "gpu-tests.xml"),
    )
    write_report(out, report)
    ok = all(r["status"] == "passed" for r in steps.rows)
    print(f"gpu_check: {'passed' if ok else 'FAILED'} in {report['seconds']:.0f} s; report in {out / 'report.md'}")
    return 0 if ok else 1


def write_report(out: Path, report: dict) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# gpu_check ({report['mode']}): {report['seconds']:.0f} s", ""]
    lines += ["| step | status | s | log |", "|---|---|---|---|"]
    for r in report["steps"]:
        lines.append(f"| {r['step']} | {r['status']} {r.get('why', '')} | {r['seconds']} | {r.get('log', '')} |")
    if report["gpu_tests"]:
        lines += ["", "pytest -m gpu: " + ", ".join(f"{v} {k}" for k, v in report["gpu_tests"].items())]
    for r in report["steps"]:  # each step's last lines: the figures the benches print
        if r.get("log"):
            tail = (out / r["log"]).read_text(errors="replace").splitlines()[-15:]
            lines += ["", f"## {r['step']}", "```", *tail, "```"]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("wheelhouse", help="download and build the wheels the GPU machine lacks")
    w.add_argument("dest", type=Path)
    c = sub.add_parser("check", help="install, build, test and benchmark; a report in --out")
    c.add_argument("--out", type=Path, required=True, help="a new or empty directory for the logs and the report")
    c.add_argument("--wheelhouse", type=Path, default=REPO / ".wheels-gpu")
    c.add_argument("--cpu", action="store_true", help="CPU sizes, no GPU-only steps (what CI runs)")
    c.add_argument("--budget-s", type=float, default=450, help="steps that would end later are skipped")
    args = p.parse_args(argv)
    if args.command == "wheelhouse":
        wheelhouse(args.dest)
        return 0
    if args.budget_s <= 0:
        fail(f"--budget-s must be > 0, not {args.budget_s}")
    return check(args.out, args.wheelhouse, args.cpu, args.budget_s)


if __name__ == "__main__":
    sys.exit(main())
