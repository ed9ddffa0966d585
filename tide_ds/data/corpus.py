"""The embedded demo corpus: Python standard library sources, present on every machine.

Also reads plain text files or directories (UTF-8; a binary or undecodable file is refused). Files
are split into train / held-out by a stable hash of their path, tokenized once, joined with EOS and
cut into fixed windows; where that leaves one side without a file (a single text file), the windows
are split instead. Held-out rows are never trained on.
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


def in_fraction(path: Path, fraction: float, salt: str = "") -> bool:
    """Whether a file falls in a `fraction` of files chosen by a stable hash of its name; another
    `salt` draws a choice independent of this one."""
    h = int(hashlib.sha1((salt + path.name).encode()).hexdigest()[:8], 16)
    return h % 10_000 < fraction * 10_000


def is_holdout(path: Path, fraction: float) -> bool:
    return in_fraction(path, fraction)


def read_text(path: Path) -> str:
    """A text file's contents; a binary file (a NUL byte) or one that is not UTF-8 is refused, naming
    the byte offset, rather than read as replacement characters."""
    raw = Path(path).read_bytes()
    nul = raw.find(b"\0")
    if nul >= 0:
        raise ConfigError(f"data.source: {path} is binary (a NUL byte at offset {nul}); give UTF-8 text files")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"data.source: {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            f"convert it to UTF-8 (e.g. iconv -t utf-8)"
        ) from None


def holdout_rows(rows: int, fraction: float, source: str) -> int:
    """How many of `rows` rows are held out: holdout_fraction of them, at least one, and at least one
    left to train on; too few rows for both is refused, naming how many are needed."""
    held = max(1, int(rows * fraction))
    if rows - held < 1:
        raise ConfigError(
            f"data.source={source} gives {rows} row(s); a held-out split and training need at least "
            f"{held + 1} ({held} held out with data.holdout_fraction={fraction:g}, 1 to train); add data "
            f"or shorten data.seq_len"
        )
    return held


def split_text(files: list[Path], tokenizer, seq_len: int, fraction: float, source: str):
    """(train, held-out) windows of a text corpus, sharing no row: the files held out by their name's
    hash, or, where that leaves either side without a file, the last windows of the corpus."""
    held = [p for p in files if is_holdout(p, fraction)] or files[-1:]
    train = [p for p in files if p not in held]
    if train:
        return TextWindows(train, tokenizer, seq_len), TextWindows(held, tokenizer, seq_len)
    windows = TextWindows(files, tokenizer, seq_len)
    n_held = holdout_rows(len(windows), fraction, source)
    return windows.rows(0, len(windows) - n_held), windows.rows(len(windows) - n_held, len(windows))


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

    def rows(self, start: int, stop: int) -> TextWindows:
        """Windows start..stop (a view)."""
        part = TextWindows.__new__(TextWindows)
        part.windows = self.windows[start:stop]
        return part

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.windows[i]


def collate_windows(items: list[torch.Tensor]) -> dict:
    ids = torch.stack(items)
    return {"input_ids": ids, "maskable": torch.ones_like(ids, dtype=torch.bool)}
