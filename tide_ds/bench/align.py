"""Chunk alignment throughput on chat samples (the per-row step of `tide-ds prepare`).

Builds chat samples from the Python standard library sources (a prompt, then a code or prose
answer), renders and tokenizes them for both sides, then times `align_row` alone: byte placement,
chunk alignment, labels and truncation, in this one process (one core). Without --student and
--teacher it trains two small tokenizers that disagree: byte-level BPE (student, ChatML template)
and SentencePiece-style BPE with byte fallback (teacher, [INST] template).
"""

from __future__ import annotations

import argparse
import json
import random
import sysconfig
import time
from pathlib import Path

from tide_ds.data.chat import SkipRow, render_pair
from tide_ds.data.rows import Side, align_row

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
INST = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
    "message['content'] + ' [/INST]' }}{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, default=10_000, help="chat samples (default 10000)")
    parser.add_argument("--student", help="student tokenizer directory (default: a small trained byte-level BPE)")
    parser.add_argument(
        "--teacher", help="teacher tokenizer directory (default: a small trained SentencePiece-style BPE)"
    )
    parser.add_argument("--student-max-length", type=int, default=512)
    parser.add_argument("--teacher-max-length", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    texts = stdlib_texts()
    conversations = chat_samples(texts, args.samples, random.Random(args.seed))
    if args.student and args.teacher:
        student = Side.load(args.student, None, args.student_max_length)
        teacher = Side.load(args.teacher, None, args.teacher_max_length)
    else:
        student_tok, teacher_tok = trained_tokenizers("\n".join(texts[:60]))
        student = Side.of(student_tok, CHATML, args.student_max_length)
        teacher = Side.of(teacher_tok, INST, args.teacher_max_length)

    start = time.perf_counter()
    pairs = [
        render_pair(c, (student.tokenizer, student.template), (teacher.tokenizer, teacher.template))
        for c in conversations
    ]
    rendered_s = time.perf_counter() - start
    start = time.perf_counter()
    s_ids = student.encode([s.text for s, _ in pairs])
    t_ids = teacher.encode([t.text for _, t in pairs])
    tokenized_s = time.perf_counter() - start

    rows, skipped = [], 0
    start = time.perf_counter()
    for (s, t), si, ti in zip(pairs, s_ids, t_ids):
        try:
            rows.append(align_row(student, s, si, teacher, t, ti))
        except SkipRow:
            skipped += 1
    aligned_s = time.perf_counter() - start

    n = len(pairs)
    tokens = sum(map(len, s_ids)) + sum(map(len, t_ids))
    chunks = sum(r.num_chunks for r in rows)
    coverage = sum(r.chunk_bytes for r in rows) / max(1, sum(r.response_bytes for r in rows))
    print(f"samples                 {n} ({skipped} skipped), {tokens / n:.0f} tokens per sample (both sides)")
    print(
        f"student / teacher       {type(student.tokenizer).__name__} {len(student.token_bytes.table)} / "
        f"{type(teacher.tokenizer).__name__} {len(teacher.token_bytes.table)} ids"
    )
    print(f"chunks                  {chunks / max(1, len(rows)):.1f} per sample, response bytes covered {coverage:.1%}")
    print(f"render (both sides)     {n / rendered_s:10.0f} samples/s")
    print(f"tokenize (both sides)   {n / tokenized_s:10.0f} samples/s  (tokenizers' own threads)")
    print(f"align (one core)        {n / aligned_s:10.0f} samples/s  {tokens / aligned_s / 1e6:.2f} M tokens/s")
    return 0


def stdlib_texts(max_files: int = 400) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))[:max_files]
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def chat_samples(texts: list[str], n: int, rng: random.Random) -> list[list[dict[str, str]]]:
    """Prompt-answer pairs cut from the texts, a third of them two turns long."""

    def piece(size: int) -> str:
        text = rng.choice(texts)
        at = rng.randrange(max(1, len(text) - size))
        return text[at : at + size].strip() or "pass"

    samples = []
    for _ in range(n):
        turns = [
            {"role": "user", "content": "Explain this:\n" + piece(rng.randint(50, 400))},
            {"role": "assistant", "content": piece(rng.randint(200, 1500))},
        ]
        if rng.random() < 1 / 3:
            turns += [
                {"role": "user", "content": piece(rng.randint(20, 200))},
                {"role": "assistant", "content": piece(rng.randint(100, 800))},
            ]
        samples.append(turns)
    return samples


def trained_tokenizers(corpus: str, vocab_size: int = 4000):
    """A byte-level BPE and a SentencePiece-style BPE with byte fallback, trained on `corpus`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    byte_level = Tokenizer(models.BPE())
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    lines = corpus.splitlines(keepends=True)
    byte_level.train_from_iterator(
        lines,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    student = PreTrainedTokenizerFast(tokenizer_object=byte_level, eos_token="<|im_end|>", pad_token="<|endoftext|>")

    spm = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    spm.normalizer = normalizers.Replace(" ", "\u2581")
    spm.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    spm.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    spm.train_from_iterator(
        lines,
        trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"] + byte_pieces, show_progress=False
        ),
    )
    # Byte pieces belong to the model's vocabulary, not to the added (special) tokens, as in SentencePiece.
    spec = json.loads(spm.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in byte_pieces]
    spm = Tokenizer.from_str(json.dumps(spec))
    teacher = PreTrainedTokenizerFast(tokenizer_object=spm, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return student, teacher
