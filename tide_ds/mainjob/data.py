"""Stage 1: corpus split, the two tokenizers, text rows, and `tide-ds prepare` of both splits.

Tokenizer A (teacher) is a byte-level BPE (the GPT-2 / Qwen family); tokenizer B (student) a
SentencePiece-style BPE with byte fallback and a space marker (the Llama-2 / Mistral family), both
trained on the training files only. Their token boundaries disagree, so chunks are many-to-many.
The Python standard library is split by file: held-out files are never seen by either tokenizer,
the teacher or the students. The teacher is pretrained on every training file; the students distil
on the distillation set, a fraction of the training files (`corpus.distill_fraction`, chosen by a
hash of the file name), as a teacher pretrained on far more data than the distillation mixture.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tide_ds.config import ConfigError
from tide_ds.data.corpus import MASK, corpus_files, in_fraction, is_holdout, read_text
from tide_ds.mainjob.config import CorpusConfig

TEACHER_TOK, STUDENT_TOK = "tokenizer_teacher", "tokenizer_student"


def split_files(cfg: CorpusConfig) -> tuple[list[Path], list[Path]]:
    files = corpus_files("stdlib", cfg.max_files)
    held = [p for p in files if is_holdout(p, cfg.holdout_fraction)]
    train = [p for p in files if p not in held]
    return train, held


def in_distill_set(path: Path, fraction: float) -> bool:
    """A training file the students distil on: a stable hash of the name, salted so that the choice
    does not follow the held-out hash (which would leave only files near the held-out threshold)."""
    return in_fraction(path, fraction, salt="distill/")


def distill_files(cfg: CorpusConfig, train: list[Path]) -> list[Path]:
    files = [p for p in train if in_distill_set(p, cfg.distill_fraction)]
    if not files:
        raise ConfigError(
            f"corpus.distill_fraction={cfg.distill_fraction:g} selects none of the {len(train)} training files; "
            "raise it (or corpus.max_files)"
        )
    return files


def train_tokenizers(train: list[Path], cfg: CorpusConfig, out: str) -> tuple[str, str]:
    """(teacher dir, student dir): byte-level BPE and SentencePiece-style BPE, each with a mask token."""
    from tide_ds.bench.align import trained_tokenizers

    text, size = [], 0
    for p in train:
        if size >= cfg.tokenizer_chars:
            break
        text.append(read_text(p))
        size += len(text[-1])
    byte_level, sentencepiece = trained_tokenizers("\n".join(text), vocab_size=cfg.vocab_size)
    dirs = []
    for tok, name in ((byte_level, TEACHER_TOK), (sentencepiece, STUDENT_TOK)):
        tok.add_special_tokens({"mask_token": MASK})
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.save_pretrained(os.path.join(out, name))
        dirs.append(os.path.join(out, name))
    return dirs[0], dirs[1]


def text_pieces(path: Path, chars: int) -> list[str]:
    """The file cut at line ends into pieces of about `chars` characters (blank ones dropped)."""
    pieces, current, size = [], [], 0
    for line in read_text(path).splitlines(keepends=True):
        current.append(line)
        size += len(line)
        if size >= chars:
            pieces.append("".join(current))
            current, size = [], 0
    if current:
        pieces.append("".join(current))
    return [p for p in pieces if p.strip()]


def write_rows(files: list[Path], chars: int, path: str) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for p in files:
            for piece in text_pieces(p, chars):
                f.write(json.dumps({"text": piece}) + "\n")
                n += 1
    return n


def prepare_split(rows: str, out: str, teacher_tok: str, student_tok: str, cfg: CorpusConfig) -> dict:
    from tide_ds.data.prepare import PrepareConfig, SideConfig, prepare

    return prepare(
        PrepareConfig(
            data_files=[rows],
            output_dir=out,
            overwrite=True,
            student=SideConfig(tokenizer=student_tok, max_length=cfg.student_max_length),
            teacher=SideConfig(tokenizer=teacher_tok, max_length=cfg.teacher_max_length),
        )
    )


def build(cfg: CorpusConfig, out: str) -> dict:
    """Everything stage 1 writes under `out`; returns a summary for results.json."""
    os.makedirs(out, exist_ok=True)
    train, held = split_files(cfg)
    distill = distill_files(cfg, train)
    teacher_tok, student_tok = train_tokenizers(train, cfg, out)
    summary = {"distill_fraction": cfg.distill_fraction}
    for split, files in (("train", train), ("distill", distill), ("heldout", held)):
        rows = os.path.join(out, f"{split}.jsonl")
        summary[f"{split}_files"] = len(files)
        summary[f"{split}_rows"] = write_rows(files, cfg.piece_chars, rows)
        if split == "train":
            continue  # the teacher reads the training files themselves; the students, the distillation set
        report = prepare_split(rows, os.path.join(out, f"prepared_{split}"), teacher_tok, student_tok, cfg)
        summary[f"{split}_prepare"] = {
            k: report[k]
            for k in ("kept", "dropped", "truncated", "tokens", "chunks", "mean_chunk_tokens", "response_bytes_covered")
        }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary
