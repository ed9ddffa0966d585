"""`tide-ds bench targets`: a distillation run with its teacher online against the same run reading
teacher targets written once by `tide-ds teach`, and what the targets cost on disk.

For one run config (`--config`, `key=value` overrides, as for `tide-ds distill`) it runs, each in a
fresh process: `tide-ds teach` once, then the online run and the run reading the targets, in turns
(`--repeats` pairs, alternating which goes first). It prints the loop's seconds per optimizer step
and each process's peak resident memory, their ratios, the targets' bytes per row and per run, and
a projection of the targets' size for a run of `--project-rows` rows x `--project-epochs` epochs at
`--project-length` student tokens per row (default: the paper's pipeline A, see docs/targets.md).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROW_OFFSET_BYTES = 8  # each row's int64 offset into its shard's values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="the run's YAML config (as for `tide-ds distill`)")
    p.add_argument("--repeats", type=int, default=1, help="online/targets pairs, alternating their order (default 1)")
    p.add_argument("--work", help="a directory for the runs' outputs (default: a temporary one, removed after)")
    p.add_argument(
        "--project-rows",
        type=int,
        default=1_000_000,
        metavar="N",
        help="rows of the run whose targets size is projected (default 1,000,000)",
    )
    p.add_argument("--project-epochs", type=int, default=10, metavar="E", help="its epochs (default 10)")
    p.add_argument(
        "--project-length", type=int, default=512, metavar="L", help="its student tokens per row (default 512)"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. recipe=tide_cross")
    p.add_argument("--worker", choices=("teach", "distill"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)


def _worker(args) -> dict:
    from tide_ds.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.worker == "teach":
        from tide_ds.teach import teach

        summary = teach(cfg, args.out)
        out = {"seconds": summary["seconds"], "bytes": summary["bytes"], "rows": summary["rows"]}
    else:
        from tide_ds.train import distill

        result = distill(cfg)
        out = {"seconds": result["seconds"], "steps": result["steps"] - result["first_step"]}
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def _spawn(args, worker: str, overrides: list[str], out: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "tide_ds.cli", "bench", "targets", "--worker", worker]
    cmd += ["--config", args.config] if args.config else []
    cmd += ["--out", out] if out else []
    proc = subprocess.run(cmd + ["--", *overrides], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench targets: the {worker} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1].removeprefix("BENCH "))


def _check(args) -> None:
    for name in ("repeats", "project_rows", "project_epochs", "project_length"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.work and Path(args.work).exists() and any(Path(args.work).iterdir()):
        raise SystemExit(f"--work {args.work} is not empty: give a new or empty directory")


def _active_chunks(targets: Path) -> tuple[int, int]:
    """(chunk log-probs, rows) over every shard of a targets directory."""
    import torch

    values = rows = 0
    for shard in sorted(targets.glob("shard-*.pt")):
        s = torch.load(shard, map_location="cpu", weights_only=True)
        values += s["values"].numel()
        rows += s["offsets"].numel() - 1
    return values, rows


def _student_length(args) -> int:
    """The student's tokens a row can hold in this run: `tide-ds prepare`'s student.max_length, or
    data.seq_len for a text corpus."""
    from tide_ds.config import load_config
    from tide_ds.data.prepare import REPORT_NAME

    cfg = load_config(args.config, args.overrides)
    report = Path(cfg.data.source) / REPORT_NAME
    if report.is_file():
        return json.loads(report.read_text())["config"]["student"]["max_length"]
    return cfg.data.seq_len


def run(args) -> int:
    if args.worker:
        print("BENCH " + json.dumps(_worker(args)), flush=True)
        return 0
    _check(args)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tide-ds-bench-targets-"))
    try:
        return _compare(args, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def _compare(args, work: Path) -> int:
    targets = work / "targets"
    print(f"tide-ds bench targets: {' '.join(args.overrides) or '(config defaults)'}")
    taught = _spawn(args, "teach", args.overrides, str(targets))
    runs: dict[str, list[dict]] = {"online": [], "targets": []}
    for i in range(args.repeats):
        order = ("online", "targets") if i % 2 == 0 else ("targets", "online")
        for kind in order:
            over = args.overrides + [f"output_dir={work / f'{kind}{i}'}"]
            if kind == "targets":
                over += ["teacher.path=null", f"teacher.targets={targets}"]
            runs[kind].append(_spawn(args, "distill", over))
            shutil.rmtree(work / f"{kind}{i}", ignore_errors=True)

    def per_step(kind: str) -> float:
        return statistics.median(r["seconds"] / max(r["steps"], 1) for r in runs[kind])

    def peak(kind: str) -> int:
        return max(r["peak_rss_bytes"] for r in runs[kind])

    steps = runs["online"][0]["steps"]
    print(f"{steps} optimizer steps a run; time: median over {args.repeats} run(s) of loop seconds / steps")
    print(f"{'run':<10} {'s / step':>10} {'peak RSS (MiB)':>15}")
    for kind in runs:
        print(f"{kind:<10} {per_step(kind):>10.4f} {peak(kind) / 2**20:>15.1f}")
    print(
        f"targets / online: time {per_step('targets') / per_step('online'):.3f}x, "
        f"peak memory {peak('targets') / peak('online'):.3f}x"
    )
    print(f"tide-ds teach: {taught['seconds']:.1f} s for {taught['rows']} rows, {taught['bytes'] / 2**20:.3f} MiB")

    values, rows = _active_chunks(targets)
    per_row = taught["bytes"] / rows
    length = _student_length(args)
    chunks_per_token = values / rows / length
    projected_row = ROW_OFFSET_BYTES + 4 * chunks_per_token * args.project_length
    projected = projected_row * args.project_rows * args.project_epochs
    print(
        f"targets: {per_row:.1f} bytes a row on disk ({values / rows:.1f} active chunks a row of {length} student "
        f"tokens, {chunks_per_token:.3f} per token), {taught['bytes'] / 2**20:.3f} MiB this run"
    )
    print(
        f"projected: {args.project_rows:,} rows x {args.project_epochs} epochs at {args.project_length} student "
        f"tokens a row: {projected_row:.0f} bytes a row, {projected / 2**30:.2f} GiB"
    )
    return 0
