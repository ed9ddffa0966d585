"""The embedded demo corpus: Python standard library sources, present on every machine.

Also reads plain text files or directories. Files are split into train / held-out by a stable hash
of their path, tokenized once, joined with EOS and cut into fixed windows.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from tide_ds.config import ConfigError

EOS = "<|endoftext|>"
MASK = "<|mask|>"
TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst"}


def corpus_files(source: str, max_files: int) -> list[Path]:
    """Sorted files of the corpus: "stdlib", a text file, or a directory searched recursively."""
    if source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts]
    elif os.path.isfile(source):
        files = [Path(source)]
    elif os.path.isdir(source):
        files = [p for p in Path(source).rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file()]
    else:
        raise ConfigError(f"data.source not found: {source} (give 'stdlib', a text file, or a directory)")
    files = sorted(files)[:max_files] if max_files > 0 else sorted(files)
    if not files:
        raise ConfigError(f"data.source={source} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
    return files


def is_holdout(path: Path, fraction: float) -> bool:
    h = int(hashlib.sha1(path.name.encode()).hexdigest()[:8], 16)
    return h % 10_000 < fraction * 10_000


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(files: list[Path], vocab_size: int, out_dir: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with EOS and mask special tokens, saved to out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, MASK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((read_text(p) for p in files), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, mask_token=MASK)
    fast.save_pretrained(out_dir)
    return fast


class TextWindows(torch.utils.data.Dataset):
    """Fixed-length token windows over EOS-joined documents; every token is maskable (no prompt)."""

    def __init__(self, files: list[Path], tokenizer: PreTrainedTokenizerBase, seq_len: int):
        eos = tokenizer.eos_token_id
        ids: list[int] = []
        for enc in tokenizer([read_text(p) for p in files], add_special_tokens=False)["input_ids"]:
            ids.extend(enc)
            ids.append(eos)
        n = len(ids) // seq_len
        if n == 0:
            raise ConfigError(f"the corpus has {len(ids)} tokens, fewer than one window of data.seq_len={seq_len}")
        self.windows = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.windows[i]


def collate_windows(items: list[torch.Tensor]) -> dict:
    ids = torch.stack(items)
    return {"input_ids": ids, "maskable": torch.ones_like(ids, dtype=torch.bool)}
