"""`tide-ds distill`: build the pieces from the config, run the loop, save the student.

The loop is short on purpose: noising, the teacher call and the loss live in
`tide_ds.pipeline.step`, where the teacher call runs against the student's work in
`tide_ds.pipeline.schedule`, each rank's micro-batches in `tide_ds.data.sampler` (built by that
rank only, ahead, with noise that is a pure function of the row: any split over ranks and
accumulation steps, and a resumed run, see the same data and noise), models in `tide_ds.models`,
DeepSpeed wiring in `tide_ds.engine`, checkpoints in `tide_ds.checkpoint`, metrics in
`tide_ds.metrics`. Host syncs happen only in the logging branch.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import yaml
from tqdm import tqdm

from tide_ds import checkpoint
from tide_ds.config import Config, ConfigError, epoch_steps, load_config, needs_teacher, resolved, run_terms, to_dict
from tide_ds.data.collate import Collator
from tide_ds.data.corpus import collate_windows, corpus_files, holdout_rows, split_text
from tide_ds.data.prepare import REPORT_NAME, check_tokenizers, load_prepared, read_report, vocab_fingerprint
from tide_ds.data.sampler import Prefetch, RankBatches, batches_per_epoch
from tide_ds.engine import RunPlan, build_engine, init_distributed, launched_world, load_ds_config, settle
from tide_ds.engine.build import build_zero3_student, zero_stage
from tide_ds.engine.dist import fail_fast
from tide_ds.engine.guard import StepGuard
from tide_ds.engine.host import fix_mmap_threshold
from tide_ds.engine.memory import startup_summary
from tide_ds.engine.placement import BUILDS_OWN_SHARD
from tide_ds.engine.preempt import Preemption, resume_command
from tide_ds.engine.watchdog import Watchdog, beat
from tide_ds.eval import masked_token_loss
from tide_ds.metrics import MetricsLog, Phases, overlap_fraction
from tide_ds.models import build_student, build_teacher, load_tokenizer
from tide_ds.models.build import fresh_config
from tide_ds.outputs import write_dir
from tide_ds.pipeline import DistillStep, RunTerms, build_scheduler, check_overlap, resolve_terms
from tide_ds.pipeline import targets as stored


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config (see tide_ds/configs/ for examples)")
    p.add_argument(
        "--resume",
        metavar="CKPT",
        help="continue from a checkpoint directory; 'latest': the newest "
        "complete one in output_dir; 'auto': that one if there is one, else start fresh",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config and print it fully resolved (YAML); load no model or data",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-4")


def run(args) -> int:
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    if args.dry_run:
        cfg = load_config(args.config, overrides, check_files=False)
        if cfg.student.path is None:
            fresh_config(cfg.student, "student")  # its keys and heads (the size needs the tokenizer)
        out, notes = resolved(cfg)
        print(
            "\n".join(
                ["# tide-ds distill --dry-run: the resolved config (no model or data loaded)"]
                + [f"# {note}" for note in notes]
            )
        )
        print(yaml.safe_dump(out, sort_keys=False), end="")
        return 0
    result = distill(load_config(args.config, overrides))
    code = 128 + result["preempted"] if result.get("preempted") else 0  # 143 SIGTERM, 130 SIGINT, 138 SIGUSR1
    return close_distributed(code)


def close_distributed(code: int) -> int:
    """Ends the process group once every rank is done; a multi-rank process then exits with `code`."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        multi = torch.distributed.get_world_size() > 1
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        if multi:  # everything is saved; skip interpreter teardown, where gloo's threads can abort
            if "mpi4py.MPI" in sys.modules and not sys.modules["mpi4py.MPI"].Is_finalized():
                sys.modules["mpi4py.MPI"].Finalize()  # mpirun counts an exit without it as a failure
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return code


def student_tokenizer(cfg: Config):
    path = cfg.student.tokenizer or cfg.student.path or cfg.teacher.tokenizer or cfg.teacher.path
    if path is None:
        raise ConfigError("no tokenizer: set student.tokenizer (or student.path / teacher.path)")
    key = "student.tokenizer" if cfg.student.tokenizer else "student.path" if cfg.student.path else "teacher.path"
    return load_tokenizer(path, key)


def check_shared_vocab(cfg: Config, tokenizer, recipe_name: str) -> None:
    """Without per-side token ids in the data the teacher reads the student's ids: they must agree."""
    path = cfg.teacher.tokenizer or cfg.teacher.path
    teacher_tok = load_tokenizer(path, "teacher.path")
    if teacher_tok.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"recipe '{recipe_name}' on this data needs one shared vocabulary, but the teacher's tokenizer "
            f"({path}, {len(teacher_tok)} ids) differs from the student's ({len(tokenizer)} ids); use a teacher "
            "with the student's tokenizer, or prepare cross-tokenizer data with `tide-ds prepare` and recipe "
            "tide_cross"
        )


@dataclass
class Data:
    train: Any
    held_out: Any
    collate: Callable[[list], dict]
    cross_tokenizer: bool  # rows carry teacher ids of another tokenizer (pipeline A)


def build_data(cfg: Config, tokenizer) -> Data:
    """A dataset prepared by `tide-ds prepare` (read as is, never re-tokenized), or the demo text
    corpus (tokenized here with the student's tokenizer, which the teacher then shares)."""
    source = cfg.data.source
    report_path = os.path.join(source, REPORT_NAME)
    if os.path.isfile(report_path):
        report = read_report(source)
        data = load_prepared(source)
        check_prepared_tokenizers(cfg, report, tokenizer)
        check_supervision(cfg, report["config"].get("supervise", "all_turns"))
        n_held = holdout_rows(len(data), cfg.data.holdout_fraction, source)
        collate = Collator(
            report["student_eos_id"],
            cfg.diffusion.block_size,
            report["teacher_pad_id"],
            eos_padding=cfg.data.eos_padding,
        )
        return Data(
            data.select(range(n_held, len(data))),
            data.select(range(n_held)),
            collate,
            cross_tokenizer=report["config"]["pipeline"] == "cross",
        )
    files = corpus_files(source, cfg.data.max_files)
    train, held = split_text(files, tokenizer, cfg.data.seq_len, cfg.data.holdout_fraction, source)
    return Data(train, held, collate_windows, cross_tokenizer=False)


def check_supervision(cfg: Config, prepared: str) -> None:
    """The supervision scope is fixed when the data is prepared; the run may state the one it expects."""
    if cfg.data.supervise not in ("as_prepared", prepared):
        raise ConfigError(
            f"data.supervise={cfg.data.supervise} but data.source={cfg.data.source} was prepared with "
            f"supervise={prepared}; prepare it again with supervise: {cfg.data.supervise}, or set "
            f"data.supervise=as_prepared"
        )


def check_prepared_tokenizers(cfg: Config, report: dict, tokenizer) -> None:
    """Student and teacher must read the ids the data was prepared with (`tide_ds.data.prepare.check_tokenizers`)."""
    teacher_path = cfg.teacher.tokenizer or cfg.teacher.path
    sides = [("student", lambda: tokenizer, "set student.tokenizer (or student.path) to it", None)]
    if teacher_path is not None and "teacher" in report.get("tokenizers", {}):
        load = lambda: load_tokenizer(teacher_path, "teacher.path")  # noqa: E731
        sides.append(("teacher", load, "set teacher.tokenizer (or teacher.path) to it", None))
    check_tokenizers("data.source", cfg.data.source, report, sides)


def check_teacher_fits(cfg: Config, terms: RunTerms, data: Data, tokenizer) -> None:
    """Shared-vocabulary terms need one vocabulary; without its own ids the teacher reads the student's."""
    shared_only = [term.name for term in terms.terms if term.shared_vocab_only]
    if data.cross_tokenizer and shared_only:
        raise ConfigError(
            f"recipe '{cfg.recipe}' uses {', '.join(shared_only)}, which needs one shared vocabulary, but "
            f"data.source={cfg.data.source} was prepared for two tokenizers; use tide_cross, calm or "
            f"tide_shared, or prepare the data with pipeline=shared"
        )
    if not data.cross_tokenizer:
        check_shared_vocab(cfg, tokenizer, cfg.recipe)


def run_length(cfg: Config, data: Data) -> Config:
    """The config with train.steps worked out from train.epochs, once the data and the global batch
    are known; a dataset too small for one global batch stops here, before any model is loaded."""
    batches_per_epoch(len(data.train), cfg.train.global_batch_size)
    if not cfg.train.epochs:
        return cfg
    steps = epoch_steps(cfg.train.epochs, len(data.train), cfg.train.global_batch_size)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))


def distill(cfg: Config) -> dict:
    fix_mmap_threshold()  # freed host tensors go back to the system (tide_ds/engine/host.py)
    # The plan first: every batch / precision disagreement is reported before anything is loaded.
    ds_json = load_ds_config(cfg.engine.ds_config) if cfg.engine.ds_config else None
    plan, ds_config = settle(cfg, ds_json, launched_world())
    dist = init_distributed(plan.config, plan.deepspeed)
    if builds_teacher(plan.config):  # teacher targets read from disk make no collectives
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
        check_overlap(plan.config.train.scheduler, plan.config.engine.teacher_placement, backend)
    with Preemption() as signals:
        return fail_fast(lambda: _distill(plan, ds_config, dist, signals))


def preempted(engine, cfg: Config, step: int, tokenizer, signum: int, schedule) -> dict:
    """A signal asked to stop: save a complete checkpoint of `step` on every rank, say how to resume.
    The teacher calls still in flight finish first, so that no collective of theirs meets the save's."""
    schedule.drain()
    path = checkpoint.save(engine, cfg, step, tokenizer)
    if engine.dist.is_main:
        print(
            f"tide-ds distill: {signal.Signals(signum).name}: saved checkpoint {path} (step {step} of "
            f"{cfg.train.steps}); resume with: {resume_command(engine.dist.world)}",
            flush=True,
        )
    return {"preempted": signum, "checkpoint": path, "steps": step, "world": engine.dist.world}


@dataclass
class Run:
    """What the loop and the finish need, built once by `build_run`."""

    cfg: Config  # with train.steps worked out from epochs
    dist: Any
    signals: Preemption
    tokenizer: Any
    data: Data
    terms: RunTerms
    student: torch.nn.Module
    teacher: torch.nn.Module | None
    step: DistillStep
    engine: Any
    first: int  # the step to start from (0, or the resumed checkpoint's)
    eval_batches: list
    log: Callable
    targets: stored.TargetsReader | None = None  # teacher.targets: the teacher's outputs read from disk


@dataclass
class LoopResult:
    history: list  # the logged records
    seconds: float
    teacher_calls: dict
    preempted: dict | None = None  # set when a signal stopped the loop (a checkpoint was saved)


def _distill(plan: RunPlan, ds_config: dict | None, dist, signals: Preemption) -> dict:
    run = build_run(plan, ds_config, dist, signals)
    before = masked_token_loss(run.student, run.eval_batches, eps=run.cfg.diffusion.eps)
    run.log(f"held-out masked-token loss before: {before:.4f}")
    with Watchdog(dist, run.cfg.engine.timeout_s):  # a rank that stalls stops the job, named
        loop = train_loop(run)
    if loop.preempted is not None:
        return loop.preempted
    return finish(run, loop, before)


def build_run(plan: RunPlan, ds_config: dict | None, dist, signals: Preemption) -> Run:
    """Seed, resume point, data, run length, terms, models, placement and engine, in that order:
    everything that can be refused from the config and the data is refused before a model loads."""
    cfg = plan.config
    torch.manual_seed(cfg.train.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    log = print if dist.is_main else (lambda *a, **k: None)
    resume = checkpoint.start(cfg, dist, log)  # a missing or incomplete checkpoint, a used output_dir stop here
    tokenizer = student_tokenizer(cfg)
    data = build_data(cfg, tokenizer)
    plan = dataclasses.replace(plan, config=run_length(cfg, data))
    cfg = plan.config
    terms = resolve_terms(cfg.recipe, cfg.terms, "cross" if data.cross_tokenizer else "shared", cfg.objective)
    targets = open_targets(cfg, terms, data, tokenizer, log) if cfg.teacher.targets else None
    if dist.is_main:  # the memory plan before any model is built (alike on every rank)
        log(startup_summary(plan, ds_config, dist.device))
    teacher, student = build_models(cfg, terms, data, tokenizer, dist, log, ds_config)
    held_out = eval_batches(cfg, data)  # before the engine, as the global RNG has always been drawn
    checkpoint.claim(cfg, resume, dist, log)  # every refusal is behind: the output directory is taken
    step = distill_step(cfg, student, teacher, terms)
    engine = build_engine(plan, ds_config, step, dist)
    first = checkpoint.load(engine, *resume) if resume is not None else 0
    run = Run(cfg, dist, signals, tokenizer, data, terms, student, teacher, step, engine, first, held_out, log, targets)
    log_start(run)
    return run


def distill_step(cfg: Config, student, teacher, terms: RunTerms) -> DistillStep:
    """The run's one distillation step (noise, teacher call, student loss) from its config."""
    return DistillStep(
        student,
        teacher,
        terms,
        kernels=cfg.objective.kernels,
        eps=cfg.diffusion.eps,
        shared_vocab_size=cfg.objective.shared_vocab_size,
    )


def build_models(cfg: Config, terms: RunTerms, data: Data, tokenizer, dist, log=print, ds_config=None):
    """(teacher or None, student), each on this rank's device (a megatron teacher is placed later,
    lazily); under ZeRO-3 the student is built partitioned over the ranks."""
    teacher = None
    if builds_teacher(cfg):
        teacher = build_teacher_model(cfg, terms, data, tokenizer, dist.device)
    if zero_stage(ds_config) == 3:
        student = build_zero3_student(cfg, ds_config, tokenizer, dist, log)
    else:
        student = build_student(cfg.student, tokenizer, cfg.diffusion.block_size, cfg.diffusion.mask_token, log=log)
        student = student.to(dist.device)
    if cfg.engine.activation_checkpointing:
        student.checkpoint_activations()
    return teacher, student


def builds_teacher(cfg: Config) -> bool:
    """Whether the run calls a teacher model (a term reads it and no stored targets stand in for it)."""
    return needs_teacher(run_terms(cfg.recipe, cfg.terms, cfg.objective)) and not cfg.teacher.targets


def targets_fingerprint(cfg: Config, terms: RunTerms, data: Data, tokenizer) -> dict:
    """What decides a run's teacher targets (`tide_ds.pipeline.targets.fingerprint`); `tokenizer`
    as loaded, before the student adds its mask token."""
    prepared = os.path.isfile(os.path.join(cfg.data.source, REPORT_NAME))
    text_files = None if prepared else corpus_files(cfg.data.source, cfg.data.max_files)
    return stored.fingerprint(
        cfg, terms, rows=len(data.train), text_files=text_files, student_vocab=vocab_fingerprint(tokenizer)
    )


def open_targets(cfg: Config, terms: RunTerms, data: Data, tokenizer, log) -> stored.TargetsReader:
    """teacher.targets, checked against this run before any model loads."""
    stored.check_storable(cfg, terms)
    reader = stored.open_targets(cfg.teacher.targets, targets_fingerprint(cfg, terms, data, tokenizer))
    log(f"teacher targets from {cfg.teacher.targets} (no teacher is built)")
    return reader


def build_teacher_model(cfg: Config, terms: RunTerms, data: Data, tokenizer, device: torch.device):
    """The teacher on `device`, once it is known to fit the recipe and data (a sharding placement's
    teacher is built on the meta device: the placement reads only this rank's part of the weights)."""
    check_teacher_fits(cfg, terms, data, tokenizer)
    lazy = cfg.engine.teacher_placement in BUILDS_OWN_SHARD
    teacher = build_teacher(
        cfg.teacher, cfg.diffusion.mask_token, block_size=cfg.diffusion.block_size, weights=not lazy
    )
    return teacher if lazy else teacher.to(device)


def eval_batches(cfg: Config, data: Data) -> list:
    """The held-out micro-batches measured before and after training."""
    t = cfg.train
    loader = torch.utils.data.DataLoader(data.held_out, batch_size=t.micro_batch_size, collate_fn=data.collate)
    return list(itertools.islice(loader, t.eval_batches))


def log_start(run: Run) -> None:
    cfg, t = run.cfg, run.cfg.train
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in run.student.parameters())
    run.log(
        f"recipe {cfg.recipe}: {' + '.join(f'{term.weight:g}*{term.name}' for term in run.terms.terms)}"
        f"; CompDemo {'on' if run.terms.comp_demo else 'off'}; student {n_params / 1e6:.2f}M params; "
        f"{len(run.data.train)} train / {len(run.data.held_out)} held-out rows; device {run.dist.device}; "
        f"{run.dist.world} rank(s) x {t.gradient_accumulation_steps} accumulation x {t.micro_batch_size} = "
        f"global batch {t.global_batch_size}; activation checkpointing "
        f"{'on' if cfg.engine.activation_checkpointing else 'off'}"
    )


def train_loop(run: Run) -> LoopResult:
    """Steps run.first .. train.steps: this rank's micro-batches, the teacher call against the
    student's work, logging, periodic saves; a stop signal saves and returns at once."""
    cfg, t, dist, engine = run.cfg, run.cfg.train, run.dist, run.engine
    accum = t.gradient_accumulation_steps
    ranks = RankBatches(
        run.data.train,
        run.data.collate,
        run.step.noise,
        global_batch=t.global_batch_size,
        micro_batch=t.micro_batch_size,
        accumulation=accum,
        rank=dist.rank,
        seed=t.seed,
        targets=None if run.targets is None else run.targets.attach,
    )
    micro_batches = Prefetch(ranks.iterate(run.first, t.steps), depth=t.data_prefetch, pin=dist.device.type == "cuda")
    phases = Phases(dist.device)
    schedule = build_scheduler(
        t.scheduler,
        engine.teacher_targets,
        dist.device,
        phases,
        prefetch=t.teacher_prefetch,
        guard=fail_fast,
        ready=engine.overlap_ready,
    )
    guard = StepGuard(cfg, engine, run.signals, run.log)
    metrics = MetricsLog(cfg.output_dir, enabled=dist.is_main)
    bar = tqdm(range(run.first, t.steps), desc="distill", dynamic_ncols=True, mininterval=1.0, disable=not dist.is_main)
    start = since_log = time.perf_counter()
    history, tokens = [], 0
    try:
        pairs = schedule(micro_batches)
        for i in bar:
            sums: dict[str, torch.Tensor] = {}  # this step's loss and terms, averaged over micro-batches
            for _ in range(accum):
                noised, targets = next(pairs)
                loss, terms = student_step(engine, phases, noised, targets, progress=i / t.steps)
                for name, v in {"loss": loss.detach(), **terms}.items():
                    sums[name] = sums.get(name, 0) + v.float() / accum
                tokens += noised.x0.numel()
            stop = guard.after_step(i, sums)  # one sync per optimizer step: a stop signal, non-finite values
            if stop:
                saved = preempted(engine, cfg, i + 1, run.tokenizer, stop, schedule)
                return LoopResult(history, time.perf_counter() - start, {}, saved)
            if i % t.log_every == 0 or i == t.steps - 1:
                record = log_record(i, sums, tokens, engine, phases, time.perf_counter() - since_log, dist)
                metrics.write(record)
                history.append(record)
                bar.set_postfix(
                    {"loss": f"{record['loss']:.3f}", "tok/s": f"{record['tokens_per_s']:.0f}"}, refresh=False
                )
                tokens, since_log = 0, time.perf_counter()
            if t.save_every and (i + 1) % t.save_every == 0 and i + 1 < t.steps:
                saving = time.perf_counter()
                schedule.drain()  # no teacher collective in flight meets the save's
                checkpoint.save(engine, cfg, i + 1, run.tokenizer)
                since_log += time.perf_counter() - saving  # a save is no part of the steps' time
    finally:
        schedule.close()
        micro_batches.close()
        metrics.close()
    if run.teacher is not None:
        run.log(
            f"scheduler {t.scheduler}: {schedule.ahead} of {schedule.calls} teacher calls ran under the student's work"
        )
    return LoopResult(history, time.perf_counter() - start, {"total": schedule.calls, "overlapped": schedule.ahead})


def finish(run: Run, loop: LoopResult, before: float) -> dict:
    """The final checkpoint, the held-out loss after, the student as a transformers model in
    output_dir/final, and the run's config.yaml and metrics.json."""
    cfg, t, dist = run.cfg, run.cfg.train, run.dist
    if run.first < t.steps:
        checkpoint.save(run.engine, cfg, t.steps, run.tokenizer)
    after = masked_token_loss(run.student, run.eval_batches, eps=cfg.diffusion.eps)
    run.log(
        f"held-out masked-token loss after:  {after:.4f} (before {before:.4f}; {t.steps - run.first} steps in "
        f"{loop.seconds:.0f} s)"
    )
    out = os.path.join(cfg.output_dir, "final")
    with run.engine.gathered():
        if dist.is_main:  # written whole, then renamed into place: a full disk leaves the earlier final/
            write_dir(out, lambda tmp: (run.student.model.save_pretrained(tmp), run.tokenizer.save_pretrained(tmp)))
    result = {
        "heldout_loss_before": before,
        "heldout_loss_after": after,
        "steps": t.steps,
        "seconds": loop.seconds,
        "history": loop.history,
        "student_dir": out,
        "first_step": run.first,
        "world": dist.world,
        "teacher_calls": loop.teacher_calls,
    }
    if dist.is_main:
        with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
        with open(os.path.join(cfg.output_dir, "metrics.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(f"saved student to {out}")
    return result


def student_step(engine, phases: Phases, noised, targets, progress: float):
    """The student's work on one micro-batch: loss, backward, optimizer step (at accumulation boundaries)."""
    beat()
    with phases("student_fwd"):
        loss, terms = engine.loss(noised, targets, progress=progress)
    beat()
    with phases("backward"):
        engine.backward(loss)
    beat()
    with phases("optimizer"):
        engine.step()
    beat()
    return loss, terms


def log_record(step: int, sums: dict, tokens: int, engine, phases: Phases, wall: float, dist) -> dict:
    """The metrics of a log step, averaged over ranks (the loop's one sync point)."""
    loss = sums["loss"]  # the step's sums live on the loss's device: so does the token count
    stacked = torch.stack([*sums.values(), torch.tensor(float(tokens), device=loss.device)])
    if dist.world > 1:
        torch.distributed.all_reduce(stacked)
        stacked[:-1] /= dist.world
    *values, all_tokens = stacked.tolist()
    times = phases.read()
    return {
        "step": step,
        **dict(zip(sums, values)),
        "lr": engine.lr(),
        "grad_norm": engine.grad_norm(),
        "tokens_per_s": all_tokens / max(wall, 1e-9),
        "time": times,
        "overlap_fraction": overlap_fraction(times, wall),
    }
