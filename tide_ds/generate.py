"""`tide-ds generate`: sample from a BD3LM student directory (saved by `distill` or `a2d`).

Block size and mask token id come from the student's config.json (`bd3lm`); flags override them.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM

from tide_ds.config import ConfigError
from tide_ds.diffusion.sampler import generate
from tide_ds.models.attention import BACKENDS
from tide_ds.models.build import a2d_config, load_tokenizer, mask_token_id, student_family
from tide_ds.models.student import BD3LMStudent

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="student directory")
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for several prompts")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument(
        "--steps-per-block",
        type=int,
        default=None,
        help="denoising steps per block (default: the block size, one token per step)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = most likely token (deterministic)")
    p.add_argument("--block-size", type=int, default=None, help="default: the one saved with the student")
    p.add_argument("--mask-token", default=None, help="default: the mask token id saved with the student")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument(
        "--no-stop-at-eos", dest="stop_at_eos", action="store_false", help="decode all --max-new-tokens even after EOS"
    )
    p.add_argument(
        "--align-prompt",
        action="store_true",
        help="left-pad the prompt so the answer starts on a block boundary (the paper's evaluation)",
    )
    p.add_argument("--attn-backend", choices=BACKENDS, default="auto")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default="float32")
    p.add_argument("--seed", type=int, default=0)


def load_student(
    path: str,
    *,
    block_size: int | None = None,
    mask_token: str | None = None,
    attn_backend: str = "auto",
    dtype: str = "float32",
):
    """(BD3LMStudent, tokenizer) from a student directory."""
    family = student_family(path, f"--model={path}")
    tokenizer = load_tokenizer(path, "--model")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype], **a2d_config(path, family)).eval()
    saved = getattr(model.config, "bd3lm", None) or {}
    block = block_size or saved.get("block_size")
    mask_id = mask_token_id(tokenizer, mask_token, "--model") if mask_token else saved.get("mask_token_id")
    if block is None or mask_id is None:
        raise ConfigError(
            f"--model={path} is not a BD3LM student (its config.json has no bd3lm entry); convert an "
            f"AR checkpoint with `tide-ds a2d`, or pass --block-size and --mask-token"
        )
    return BD3LMStudent(model, block, mask_id, attn_backend=attn_backend), tokenizer


def run(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but this machine has no usable CUDA device; use --device cpu or auto")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    student, tokenizer = load_student(
        args.model,
        block_size=args.block_size,
        mask_token=args.mask_token,
        attn_backend=args.attn_backend,
        dtype=args.dtype,
    )
    student.to(device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    for text in args.prompt:
        if args.chat:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        else:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompt = torch.tensor([ids], device=device)
        out = generate(
            student,
            prompt,
            args.max_new_tokens,
            steps_per_block=args.steps_per_block,
            temperature=args.temperature,
            generator=generator,
            eos_token_id=tokenizer.eos_token_id if args.stop_at_eos else None,
            align_prompt=args.align_prompt,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        new = out[0, prompt.shape[1] :].tolist()
        if args.stop_at_eos and tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id)]
        print(tokenizer.decode(new, skip_special_tokens=True))
    return 0
