"""`tide-ds distill`: build the pieces from the config, run the loop, save the student.

The loop is short on purpose: noising, the teacher call and the loss live in
`tide_ds.pipeline.step`, data in `tide_ds.data`, models in `tide_ds.models`.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time

import torch
import yaml
from tqdm import tqdm

from tide_ds.config import Config, ConfigError, load_config, to_dict
from tide_ds.data.corpus import TextWindows, collate_windows, corpus_files, is_holdout
from tide_ds.eval import masked_token_loss
from tide_ds.models import build_student, build_teacher, load_tokenizer
from tide_ds.objectives import needs_teacher, resolve_terms
from tide_ds.pipeline import DistillStep


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config (see tide_ds/configs/ for examples)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-4")


def run(args) -> int:
    distill(load_config(args.config, args.overrides))
    return 0


def lr_lambda(cfg: Config):
    """Linear warm-up, then cosine decay to min_lr_ratio of the peak."""
    t = cfg.train

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        p = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))

    return f


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
            f"with the student's tokenizer, or prepare cross-tokenizer data with `tide-ds prepare` and recipe tide_cross")


def build_data(cfg: Config, tokenizer):
    files = corpus_files(cfg.data.source, cfg.data.max_files)
    held = [p for p in files if is_holdout(p, cfg.data.holdout_fraction)] or files[-1:]
    train = [p for p in files if p not in held] or files
    return TextWindows(train, tokenizer, cfg.data.seq_len), TextWindows(held, tokenizer, cfg.data.seq_len)


def distill(cfg: Config) -> dict:
    t = cfg.train
    torch.manual_seed(t.seed)
    if t.threads:
        torch.set_num_threads(t.threads)
    device = torch.device("cuda" if t.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if t.device == "auto" else t.device))
    recipe = resolve_terms(cfg.recipe, cfg.terms)
    tokenizer = student_tokenizer(cfg)
    teacher = None
    if needs_teacher(recipe):
        check_shared_vocab(cfg, tokenizer, cfg.recipe)
        teacher = build_teacher(cfg.teacher, cfg.diffusion.mask_token, block_size=cfg.diffusion.block_size).to(device)
    student = build_student(cfg.student, tokenizer, cfg.diffusion.block_size, cfg.diffusion.mask_token).to(device)
    train_set, eval_set = build_data(cfg, tokenizer)
    loader = torch.utils.data.DataLoader(train_set, batch_size=t.micro_batch_size, shuffle=True, drop_last=True,
                                         collate_fn=collate_windows, generator=torch.Generator().manual_seed(t.seed))
    eval_batches = list(itertools.islice(torch.utils.data.DataLoader(
        eval_set, batch_size=t.micro_batch_size, collate_fn=collate_windows), t.eval_batches))

    step = DistillStep(student, teacher, recipe, cfg.objective, eps=cfg.diffusion.eps)
    decay = [p for n, p in student.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in student.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=t.lr, betas=t.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    gen = torch.Generator(device=device).manual_seed(t.seed + 1)  # noise draws, on the batch's device

    n_params = sum(p.numel() for p in student.parameters())
    print(f"recipe {cfg.recipe}: {' + '.join(f'{w:g}*{n}' for n, w in recipe.terms.items())}"
          f"{' (CompDemo)' if recipe.comp_demo else ''}; student {n_params / 1e6:.2f}M params; "
          f"{len(train_set)} train / {len(eval_set)} held-out windows of {cfg.data.seq_len} tokens; device {device}")
    before = masked_token_loss(student, eval_batches, eps=cfg.diffusion.eps)
    print(f"held-out masked-token loss before: {before:.4f}")

    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    bar = tqdm(range(t.steps), desc="distill", dynamic_ncols=True, mininterval=1.0)
    start = time.time()
    history = []
    for i in bar:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in next(batches).items()}
        noised = step.noise(batch, generator=gen)
        targets = step.teacher_targets(noised)
        loss, terms = step.loss(noised, targets, progress=i / t.steps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), t.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if i % t.log_every == 0 or i == t.steps - 1:
            values = {k: v.item() for k, v in terms.items()}  # sync point: logging only
            values["loss"] = loss.item()
            history.append({"step": i, **values})
            bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()}, refresh=False)
    elapsed = time.time() - start

    after = masked_token_loss(student, eval_batches, eps=cfg.diffusion.eps)
    print(f"held-out masked-token loss after:  {after:.4f} (before {before:.4f}; {t.steps} steps in {elapsed:.0f} s)")
    out = os.path.join(cfg.output_dir, "final")
    student.model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    result = {"heldout_loss_before": before, "heldout_loss_after": after, "steps": t.steps, "seconds": elapsed,
              "history": history, "student_dir": out}
    with open(os.path.join(cfg.output_dir, "metrics.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"saved student to {out}")
    return result
