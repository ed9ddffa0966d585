"""`tide-ds a2d`: turn an autoregressive checkpoint (Qwen3 / Llama family) into a BD3LM student.

The weights are kept as they are; the student differs from the AR model in how it is run (the
[x_t ; x_0] layout with the block-diffusion mask), which training then adapts it to. Conversion
adds the mask token when the tokenizer has none (growing the embeddings when they have no spare
row) and records the block size and mask token id in config.json (`bd3lm`), so the
output directory trains with `student.path=...` and generates with `tide-ds generate --model`.
"""

from __future__ import annotations

import argparse
import os

from tide_ds.config import ConfigError, ModelConfig
from tide_ds.models.build import build_student, load_tokenizer
from tide_ds.outputs import check_out_dir, write_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="AR checkpoint directory (transformers, Qwen3 or Llama family)")
    p.add_argument("--out", required=True, help="output directory for the student")
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--mask-token", default="<|mask|>", help="mask token; added when the tokenizer lacks it")
    p.add_argument("--kind", choices=("auto", "qwen3", "llama"), default="auto")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16")


def convert(
    model: str,
    out: str,
    *,
    tokenizer: str | None = None,
    block_size: int = 32,
    mask_token: str = "<|mask|>",
    kind: str = "auto",
    dtype: str = "bfloat16",
    overwrite: bool = False,
):
    """Writes the student (model and tokenizer) to `out`, whole or not at all; returns the
    BD3LMStudent. A non-empty `out` is replaced only with `overwrite`, once the new one is complete."""
    if block_size < 1:
        raise ConfigError(f"--block-size must be >= 1, got {block_size}")
    if os.path.abspath(out) == os.path.abspath(model):
        raise ConfigError("--out must differ from --model (the AR checkpoint is left untouched)")
    check_out_dir(out, overwrite, "--out")
    tok = load_tokenizer(tokenizer or model, "--tokenizer" if tokenizer else "--model")
    cfg = ModelConfig(path=model, kind=kind, dtype=dtype)
    student = build_student(cfg, tok, block_size, mask_token)
    write_dir(out, lambda tmp: (student.model.save_pretrained(tmp), tok.save_pretrained(tmp)))
    return student


def run(args) -> int:
    student = convert(
        args.model,
        args.out,
        tokenizer=args.tokenizer,
        block_size=args.block_size,
        mask_token=args.mask_token,
        kind=args.kind,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    cfg = student.model.config
    print(
        f"wrote BD3LM student {args.out}: {cfg.model_type}, block size {student.block_size}, "
        f"mask token {args.mask_token!r} = id {student.mask_token_id}, vocabulary {student.output_weight.shape[0]}"
    )
    return 0
