"""`tide-ds demo`: the main job, on an embedded default that exists on any machine.

1. data     the Python standard library split by file; tokenizer A (byte-level BPE, teacher) and
            B (SentencePiece-style BPE, student) trained on the training files; `tide-ds prepare`
            of the training and held-out rows for both (many-to-many chunks);
2. teacher  an LLaDA2-style MoE pretrained as a masked diffusion LM with tokenizer A;
3. init     per seed (configs/demo.yaml `seeds`), one random BD3LM student with tokenizer B, saved:
            every recipe of that seed starts from it;
4. distill  one student per recipe (configs/demo.yaml `recipes`) and seed, that seed's data order
            and noise; `parallel` runs at once, each a `tide-ds distill` process;
5. eval     the teacher and every student on the same masked held-out chunks (bits per byte, NLL per
            token) at several masking ratios, chunk agreement with the teacher, samples,
            HumanEval pass@1 (sandboxed);
6. report   results.json, results.md, PNG plots, TensorBoard events (tide_ds.mainjob.report).
A stage whose output exists is reused (each writes a `.done` marker last); --redo redoes stages
(and every stage after it); --long selects the longer run (configs/demo.yaml `long`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import torch

from tide_ds.config import ConfigError, load_config, load_dataclass
from tide_ds.mainjob.config import MainJobConfig, config_path

STAGES = ("data", "teacher", "init", "distill", "eval", "report")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="output folder (default runs/demo, or runs/demo_long with --long)")
    p.add_argument(
        "--redo",
        nargs="?",
        const=STAGES[0],
        metavar="STAGE",
        default=None,
        help=f"redo this stage and every one after it ({', '.join(STAGES)}); no name: everything",
    )
    p.add_argument("--long", action="store_true", help="the longer, stronger run (more teacher and student steps)")
    p.add_argument("--recipes", help="comma-separated subset of the recipes in configs/demo.yaml")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="overrides of configs/demo.yaml, e.g. seed=1 student_steps=400 eval.humaneval_problems=20",
    )


def output_dir(args) -> str:
    """Where the stages go: the long run has its own folder, so that it never reuses a short run's stages."""
    return args.out or ("runs/demo_long" if args.long else "runs/demo")


def load_job(args):
    cfg = load_dataclass(MainJobConfig, config_path("demo.yaml"), list(args.overrides))
    if args.long:
        cfg.teacher.train.steps, cfg.student_steps = cfg.long.teacher_steps, cfg.long.student_steps
        cfg.eval.humaneval_problems = cfg.long.humaneval_problems
    if not 0 <= cfg.teacher.train.ar_steps < cfg.teacher.train.steps:
        raise ConfigError(
            f"teacher.train.ar_steps={cfg.teacher.train.ar_steps} must be >= 0 and below "
            f"teacher.train.steps={cfg.teacher.train.steps} (the rest are masked diffusion steps)"
        )
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds) or not all(isinstance(s, int) for s in cfg.seeds):
        raise ConfigError(f"seeds={cfg.seeds} must be a non-empty list of distinct integers, e.g. seeds=[0,1,2]")
    if not 0 < cfg.corpus.distill_fraction <= 1:
        raise ConfigError(
            f"corpus.distill_fraction={cfg.corpus.distill_fraction:g} must be in (0, 1] "
            "(the fraction of the training files the students distil on)"
        )
    if cfg.parallel < 1:
        raise ConfigError(f"parallel={cfg.parallel} must be >= 1 (student runs at once)")
    if args.recipes:
        wanted = [r.strip() for r in args.recipes.split(",") if r.strip()]
        unknown = [r for r in wanted if r not in cfg.recipes]
        if unknown:
            raise ConfigError(f"--recipes: unknown {', '.join(unknown)}; choose from {', '.join(cfg.recipes)}")
        cfg.recipes = {r: cfg.recipes[r] for r in wanted}
    if args.redo is not None and args.redo not in STAGES:
        raise ConfigError(f"--redo: unknown stage {args.redo!r}; choose from {', '.join(STAGES)}")
    return cfg


class Stages:
    """Reuse and redo: a stage is done when its `.done` marker exists and no earlier stage was redone."""

    def __init__(self, out: str, redo: str | None):
        self.out = out
        self.redo_from = len(STAGES) if redo is None else STAGES.index(redo)

    def done(self, stage: str, path: str) -> bool:
        return STAGES.index(stage) < self.redo_from and os.path.isfile(os.path.join(path, ".done"))

    @staticmethod
    def mark(path: str) -> None:
        with open(os.path.join(path, ".done"), "w") as f:
            f.write(time.strftime("%Y-%m-%dT%H:%M:%S\n"))

    @staticmethod
    def fresh(path: str) -> str:
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.makedirs(path)
        return path


def run(args) -> int:
    from tide_ds.mainjob import data as data_stage
    from tide_ds.mainjob import report
    from tide_ds.mainjob import teacher as teacher_stage

    cfg = load_job(args)
    report.check_dependencies()  # before hours of work, not after
    torch.set_num_threads(cfg.threads)
    out = output_dir(args)
    stages = Stages(out, args.redo)
    timings: dict[str, dict] = {}
    data_dir, teacher_dir, init_dir = (os.path.join(out, d) for d in ("data", "teacher", "student_init"))

    def timed(name, fn):
        wall, cpu = time.time(), cpu_seconds()
        result = fn()
        timings[name] = {"wall_s": round(time.time() - wall, 1), "cpu_s": round(cpu_seconds() - cpu, 1)}
        return result

    train_files, _ = data_stage.split_files(cfg.corpus)
    distill_files = data_stage.distill_files(cfg.corpus, train_files)  # an empty set is refused before any work
    print(
        f"[1/6] data: stdlib split by file ({len(train_files)} training files, {len(distill_files)} of them "
        f"the distillation set), two tokenizers, tide-ds prepare -> {data_dir}"
    )
    if not stages.done("data", data_dir):
        timed("data", lambda: data_stage.build(cfg.corpus, stages.fresh(data_dir)))
        stages.mark(data_dir)
    teacher_tok, student_tok = (os.path.join(data_dir, n) for n in (data_stage.TEACHER_TOK, data_stage.STUDENT_TOK))

    print(f"[2/6] teacher: LLaDA2-style MoE masked diffusion LM, {cfg.teacher.train.steps} steps -> {teacher_dir}")
    if not stages.done("teacher", teacher_dir):
        timed(
            "teacher",
            lambda: teacher_stage.pretrain(cfg.teacher, teacher_tok, train_files, stages.fresh(teacher_dir), cfg.seed),
        )
        stages.mark(teacher_dir)

    student_cfg = [
        f"teacher.path={teacher_dir}",
        f"student.tokenizer={student_tok}",
        f"data.source={os.path.join(data_dir, 'prepared_distill')}",
        f"train.threads={cfg.threads}",
        f"train.steps={cfg.student_steps}",
    ]
    print(f"[3/6] student initialisations (BD3LM, tokenizer B), one per seed -> {init_dir}")
    init_cfg = load_config(config_path("demo_student.yaml"), student_cfg)
    for seed in cfg.seeds:
        where = seed_dir(init_dir, seed)
        if not stages.done("init", where):
            save_student_init(init_cfg, stages.fresh(where), seed)
            stages.mark(where)

    jobs = []
    for seed in cfg.seeds:
        for name, spec in cfg.recipes.items():
            run_dir = seed_dir(os.path.join(out, "students", name), seed)
            if stages.done("distill", run_dir):
                print(f"      reusing {run_dir}")
                continue
            over = student_cfg + [
                f"train.seed={seed}",
                f"student.path={seed_dir(init_dir, seed)}",
                "student.init={}",
                f"output_dir={run_dir}",
                f"recipe={spec['recipe']}",
                f"terms={json.dumps(spec['terms'])}",
            ]
            jobs.append((f"{name}/seed{seed}", run_dir, over))
    print(
        f"[4/6] distillation: {', '.join(cfg.recipes)} x seeds {cfg.seeds} ({cfg.student_steps} steps each), "
        f"{len(jobs)} runs, {cfg.parallel} at once"
    )
    timed("distill", lambda: timings.update(distill_runs(jobs, cfg.parallel, cfg.threads, stages)))

    print("[5/6] evaluation: held-out bits per byte and NLL, chunk agreement, samples, HumanEval")
    eval_dir = os.path.join(out, "eval")
    os.makedirs(eval_dir, exist_ok=True)
    timed("eval", lambda: evaluate_all(cfg, out, stages, teacher_dir))

    print(f"[6/6] report -> {out}/results.json, results.md, plots/, tb/")
    report.write(cfg, out, timings)
    return 0


def seed_dir(path: str, seed: int) -> str:
    return os.path.join(path, f"seed{seed}")


def cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (the student runs)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def distill_runs(jobs: list[tuple[str, str, list[str]]], parallel: int, threads: int, stages: Stages) -> dict:
    """Runs `tide-ds distill` for each (label, run dir, overrides), `parallel` processes at once,
    each with `threads` threads and its output in <run dir>/train.log; marks each run done as it
    finishes. Returns {"distill/<label>": {"wall_s"}}; a failed run stops the job once the others end."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    pending, running, times, failed = list(jobs), [], {}, []
    while pending or running:
        while pending and len(running) < parallel:
            label, run_dir, over = pending.pop(0)
            log = open(os.path.join(Stages.fresh(run_dir), "train.log"), "w", encoding="utf-8")
            cmd = [sys.executable, "-m", "tide_ds.cli", "distill", "--config", config_path("demo_student.yaml"), *over]
            print(f"      {label}: started (log {log.name})")
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((label, run_dir, proc, log, time.time()))
        time.sleep(0.2)
        for job in [j for j in running if j[2].poll() is not None]:
            label, run_dir, proc, log, start = job
            running.remove(job)
            log.close()
            times[f"distill/{label}"] = {"wall_s": round(time.time() - start, 1)}
            if proc.returncode == 0:
                stages.mark(run_dir)
                print(f"      {label}: done in {times[f'distill/{label}']['wall_s']} s")
            else:
                failed.append(f"{label} (exit code {proc.returncode}; see {log.name})")
                pending.clear()  # start nothing new; let the running ones finish
    if failed:
        raise RuntimeError(f"distillation failed: {', '.join(failed)}")
    return times


def save_student_init(run_cfg, out: str, seed: int) -> None:
    from tide_ds.models import build_student, load_tokenizer

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(run_cfg.student.tokenizer, "student.tokenizer")
    student = build_student(run_cfg.student, tokenizer, run_cfg.diffusion.block_size, run_cfg.diffusion.mask_token)
    student.model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def evaluate_all(cfg, out: str, stages: Stages, teacher_dir: str) -> None:
    """The teacher once; the initialisation and every student of every seed, on the same masked chunks."""
    from tide_ds.eval.cli import teacher_losses

    e = cfg.eval
    heldout = os.path.join(out, "data", "prepared_heldout")
    teacher_out = os.path.join(out, "eval", "teacher")
    if not stages.done("eval", teacher_out):
        os.makedirs(teacher_out, exist_ok=True)
        with open(os.path.join(seed_dir(os.path.join(out, "student_init"), cfg.seeds[0]), "config.json")) as f:
            block_size = json.load(f)["bd3lm"]["block_size"]  # the students' batches, hence their draws
        bpb = teacher_losses(teacher_dir, heldout, block_size, e.ratios, e.batches)
        _write_json(os.path.join(teacher_out, "results.json"), {"bpb": bpb})
        stages.mark(teacher_out)
    tasks = ["bpb", "agreement", "samples"] + (["humaneval"] if e.humaneval_problems else [])
    for seed in cfg.seeds:
        for name in ["init"] + list(cfg.recipes):
            evaluate_one(cfg, out, stages, teacher_dir, name, seed, tasks)


def evaluate_one(cfg, out: str, stages: Stages, teacher_dir: str, name: str, seed: int, tasks: list[str]) -> None:
    from tide_ds.eval.cli import evaluate

    e = cfg.eval
    if name == "init":
        model = seed_dir(os.path.join(out, "student_init"), seed)
    else:
        model = os.path.join(seed_dir(os.path.join(out, "students", name), seed), "final")
    where = seed_dir(os.path.join(out, "eval", name), seed)
    if stages.done("eval", where):
        return
    os.makedirs(where, exist_ok=True)
    print(f"      {name}/seed{seed}")
    results = evaluate(
        model,
        tasks,
        data=os.path.join(out, "data", "prepared_heldout"),
        teacher=teacher_dir,
        ratios=e.ratios,
        batches=e.batches,
        agreement_ratio=e.agreement_ratio,
        humaneval_problems=e.humaneval_problems,
        max_new_tokens=e.max_new_tokens,
        steps_per_block=e.steps_per_block,
        n_samples=e.samples,
        sample_new_tokens=e.sample_new_tokens,
        desc=f"{name}/seed{seed}",
    )
    _write_json(os.path.join(where, "results.json"), results)
    stages.mark(where)


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
