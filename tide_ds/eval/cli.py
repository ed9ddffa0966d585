"""`tide-ds eval`: evaluate a BD3LM student directory.

Tasks (comma-separated, all checked before any work):
  nll        held-out masked-token NLL at several masking ratios (needs --data)
  bpb        bits per byte of the masked chunks' bytes and NLL per token of those chunks, at the same
             ratios, on the chunks any model is scored on (needs --data for two tokenizers, --teacher
             for its byte table)
  agreement  chunk-level agreement with the teacher (needs --data prepared for two tokenizers, --teacher)
  samples    a few block-diffusion generations from held-out prompts (needs --data)
  humaneval  HumanEval pass@1, completions executed in the sandbox (tide_ds.eval.sandbox)
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from tide_ds.config import ConfigError
from tide_ds.outputs import check_out_file

TASKS = ("nll", "bpb", "agreement", "samples", "humaneval")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="student directory (saved by tide-ds distill)")
    p.add_argument("--tasks", default="nll,samples", help=f"comma-separated, from {', '.join(TASKS)}")
    p.add_argument("--data", help="held-out dataset directory written by tide-ds prepare")
    p.add_argument("--teacher", help="teacher model directory (for agreement)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the one saved with the model)")
    p.add_argument("--ratios", default="0.15,0.3,0.5,0.7,0.9", help="masking ratios for nll")
    p.add_argument("--batches", type=int, default=8, help="held-out batches of 16 rows (nll, agreement)")
    p.add_argument("--humaneval-problems", type=int, default=164)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--steps-per-block", type=int, default=8)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", help="write the results here as JSON (default: print only)")


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ConfigError(
            f"unknown task {', '.join(map(repr, unknown)) or '(none given)'} in --tasks; choose from {', '.join(TASKS)}"
        )
    return tasks


def load_model(path: str, tokenizer_path: str | None = None):
    """(student, tokenizer), refusing a missing directory and a tokenizer that does not fit."""
    from tide_ds.generate import load_student
    from tide_ds.models import load_tokenizer

    if not os.path.isdir(path):
        raise ConfigError(f"--model not found: {path} (give a student directory saved by tide-ds distill)")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ConfigError(f"--model={path} has no config.json; give a student directory saved by tide-ds distill")
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    if tokenizer_path is not None:  # checked against config.json, before any weight is read
        tokenizer = load_tokenizer(tokenizer_path, "--tokenizer")
        vocab, mask = config.get("vocab_size"), (config.get("bd3lm") or {}).get("mask_token_id")
        mask_id = tokenizer.convert_tokens_to_ids(tokenizer.mask_token) if tokenizer.mask_token else None
        if vocab is None or len(tokenizer) > vocab or mask_id != mask:
            raise ConfigError(
                f"the tokenizer {tokenizer_path} ({len(tokenizer)} ids, mask id {mask_id}) does not match "
                f"the model ({vocab} ids, mask id {mask}); pass the tokenizer the student was trained "
                f"with as --tokenizer, or omit it"
            )
    student, saved = load_student(path)
    tokenizer = tokenizer if tokenizer_path is not None else saved
    return student.eval(), tokenizer


def check_data_tokenizers(data_dir: str, tokenizer, teacher: str | None) -> None:
    """The student (and the teacher, for agreement) must read the ids --data was prepared with, as
    `tide-ds distill` checks them; the student's tokenizer may hold the mask token it added since."""
    from tide_ds.data.prepare import check_tokenizers, read_report
    from tide_ds.models import load_tokenizer

    report = read_report(data_dir)
    sides = [("student", lambda: tokenizer, "give a student trained on it as --model", tokenizer.mask_token)]
    if teacher is not None and "teacher" in report.get("tokenizers", {}):
        sides.append(("teacher", lambda: load_tokenizer(teacher, "--teacher"), "give that teacher as --teacher", None))
    check_tokenizers("--data", data_dir, report, sides)


def heldout_batches(data_dir: str, block_size: int, batches: int) -> list[dict]:
    from tide_ds.data.collate import Collator
    from tide_ds.data.prepare import load_prepared, read_report

    data = load_prepared(data_dir)
    report = read_report(data_dir)
    collate = Collator(report["student_eos_id"], block_size, report["teacher_pad_id"], train_on_padding=False)
    n = min(len(data), batches * 16)
    return [collate([data[i] for i in range(lo, min(lo + 16, n))]) for lo in range(0, n, 16)]


def byte_lengths(teacher_dir: str) -> torch.Tensor:
    """[vocab] bytes of each teacher id (its tokenizer's byte table), to count the chunks' bytes."""
    from tide_ds.align import TokenBytes
    from tide_ds.models import load_tokenizer

    lengths = TokenBytes(load_tokenizer(teacher_dir, "--teacher")).lengths
    return torch.from_numpy(lengths)


def teacher_losses(teacher_dir: str, data: str, block_size: int, ratios, batches: int, *, seed: int = 1234) -> dict:
    """The teacher's row of the `bpb` task: the same batches (padded to the student's `block_size`),
    the same draws, hence the same masked chunks as every student scored with that seed."""
    from tide_ds.config import ModelConfig
    from tide_ds.eval.agreement import chunk_losses
    from tide_ds.models import build_teacher

    teacher = build_teacher(ModelConfig(path=teacher_dir), "<|mask|>")
    batches_ = heldout_batches(data, block_size, batches)
    return chunk_losses(teacher, "teacher", batches_, list(ratios), byte_lengths(teacher_dir), seed=seed)


@torch.no_grad()
def samples(student, tokenizer, data_dir: str, count: int, new_tokens: int, steps_per_block: int) -> list[dict]:
    """Greedy continuations of the first lines of held-out rows."""
    from tide_ds.data.prepare import load_prepared
    from tide_ds.diffusion.sampler import generate

    data = load_prepared(data_dir)
    out = []
    for i in range(min(count, len(data))):
        ids = list(data[i * 7 % len(data)]["input_ids"])[:24]
        gen = generate(student, torch.tensor([ids]), new_tokens, steps_per_block=steps_per_block)[0].tolist()
        prompt = tokenizer.decode(ids, skip_special_tokens=True)
        out.append({"prompt": prompt, "completion": tokenizer.decode(gen, skip_special_tokens=True)[len(prompt) :]})
    return out


def evaluate(
    model_dir: str,
    tasks: list[str],
    *,
    data: str | None = None,
    teacher: str | None = None,
    tokenizer: str | None = None,
    ratios=(0.15, 0.3, 0.5, 0.7, 0.9),
    batches: int = 8,
    agreement_ratio: float = 0.5,
    humaneval_problems: int = 164,
    max_new_tokens: int = 64,
    steps_per_block: int = 8,
    n_samples: int = 3,
    sample_new_tokens: int = 48,
    seed: int = 1234,
    desc: str = "eval",
) -> dict:
    counts = {"--batches": batches, "--max-new-tokens": max_new_tokens, "--steps-per-block": steps_per_block}
    if "humaneval" in tasks:  # the main job's humaneval_problems 0 leaves the task out
        counts["--humaneval-problems"] = humaneval_problems
    for flag, value in counts.items():
        if value < 1:  # 0 batches would report a loss of 0.0
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    bad = [r for r in ratios if not 0.0 < r <= 1.0]
    if bad:
        raise ConfigError(f"--ratios must be masking ratios in (0, 1], got {bad[0]}")
    needs_data = [t for t in tasks if t in ("nll", "bpb", "agreement", "samples")]
    if needs_data and (data is None or not os.path.isdir(data)):
        raise ConfigError(
            f"task {needs_data[0]} needs --data, a held-out directory written by tide-ds prepare"
            + (f" ({data} not found)" if data else "")
        )
    needs_teacher = [t for t in tasks if t in ("bpb", "agreement")]
    if needs_teacher and (teacher is None or not os.path.isdir(teacher)):
        raise ConfigError(
            f"task {needs_teacher[0]} needs --teacher, the teacher model directory"
            + (f" ({teacher} not found)" if teacher else "")
        )
    problems = None
    if "humaneval" in tasks:
        from tide_ds.eval.humaneval import load_problems

        problems = load_problems(humaneval_problems)
    student, tok = load_model(model_dir, tokenizer)
    if needs_data:
        check_data_tokenizers(data, tok, teacher if needs_teacher else None)
    results: dict = {}
    batches_ = heldout_batches(data, student.block_size, batches) if needs_data else []
    if "nll" in tasks:
        from tide_ds.eval.loss import masked_nll

        results["nll"] = masked_nll(student, batches_, list(ratios), seed=seed)
    if "bpb" in tasks:
        from tide_ds.eval.agreement import chunk_losses

        results["bpb"] = chunk_losses(student, "student", batches_, list(ratios), byte_lengths(teacher), seed=seed)
    if "agreement" in tasks:
        from tide_ds.config import ModelConfig
        from tide_ds.eval.agreement import chunk_agreement
        from tide_ds.models import build_teacher

        t_model = build_teacher(ModelConfig(path=teacher), "<|mask|>")
        results["agreement"] = chunk_agreement(student, t_model, batches_, ratio=agreement_ratio, seed=seed)
    if "samples" in tasks:
        results["samples"] = samples(student, tok, data, n_samples, sample_new_tokens, steps_per_block)
    if "humaneval" in tasks:
        from tide_ds.eval.humaneval import pass_at_1

        results["humaneval"] = pass_at_1(
            student, tok, problems, max_new_tokens=max_new_tokens, steps_per_block=steps_per_block, desc=desc
        )
    return results


def run(args) -> int:
    tasks = parse_tasks(args.tasks)
    if args.out:
        check_out_file(args.out, "--out")
    try:
        ratios = [float(r) for r in args.ratios.split(",")]
    except ValueError:
        raise ConfigError(f"--ratios must be comma-separated numbers in (0, 1], got {args.ratios!r}") from None
    results = evaluate(
        args.model,
        tasks,
        data=args.data,
        teacher=args.teacher,
        tokenizer=args.tokenizer,
        ratios=ratios,
        batches=args.batches,
        humaneval_problems=args.humaneval_problems,
        max_new_tokens=args.max_new_tokens,
        steps_per_block=args.steps_per_block,
        seed=args.seed,
    )
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0
