"""Exact token bytes, and chunk alignment between two tokenizations of the same text.

A chunk is the smallest run of teacher tokens and run of student tokens that spell the same bytes
(TIDE section 5). Every token is first turned into the exact bytes it contributes to its text; the
chunk boundaries are then the byte offsets where both tokenizations have a token boundary. A chunk
whose bytes differ on the two sides (a lossy tokenizer, an unknown token) is dropped, never paired.

Three layers:
- `token_byte_table(tokenizer)`: the bytes of every vocabulary id, for byte-level BPE (HF and
  tiktoken-style), SentencePiece (byte fallback, the space marker), WordPiece (continuation marker)
  and special tokens.
- `place_tokens(text, pieces, offsets)`: where each token lies in the UTF-8 bytes of its text, and
  whether it spells those bytes exactly (it does not after lowercasing, accent stripping, [UNK]).
- `align_chunks(teacher_bytes, student_bytes)` and `align_spans(teacher, student)`: the two-pointer
  alignment over byte offsets, done with sorted-array operations instead of a Python loop.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece byte-fallback piece


# ---------------------------------------------------------------------------------------------
# Token bytes


def token_byte_table(tokenizer) -> list[bytes]:
    """The bytes each vocabulary id stands for inside running text, indexed by id.

    Accepts a transformers tokenizer (fast), a `tokenizers.Tokenizer`, a tiktoken-style encoding
    (anything with `decode_single_token_bytes`) or a `sentencepiece.SentencePieceProcessor`.
    SentencePiece pieces keep their leading space ("▁Hello" -> b" Hello"); `place_tokens` removes a
    space the tokenizer added in front of the text (the dummy prefix).
    """
    if hasattr(tokenizer, "decode_single_token_bytes"):
        return _tiktoken_table(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None and hasattr(tokenizer, "get_added_tokens_decoder") and hasattr(tokenizer, "to_str"):
        backend = tokenizer  # a bare tokenizers.Tokenizer
    if backend is not None:
        return _hf_table(backend)
    if hasattr(tokenizer, "id_to_piece"):
        return _sentencepiece_table(tokenizer)
    raise TypeError(
        f"cannot read token bytes from a {type(tokenizer).__name__}: give a transformers fast tokenizer, "
        "a tokenizers.Tokenizer, a tiktoken-style encoding or a sentencepiece.SentencePieceProcessor"
    )


def _tiktoken_table(enc) -> list[bytes]:
    size = getattr(enc, "n_vocab", None) or enc.max_token_value + 1
    table = []
    for i in range(size):
        try:
            table.append(enc.decode_single_token_bytes(i))
        except (KeyError, ValueError, RuntimeError):  # ids the encoding leaves unused
            table.append(b"")
    return table


def _sentencepiece_table(sp) -> list[bytes]:
    table = []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            table.append(bytes([int(_BYTE_PIECE.match(piece).group(1), 16)]))
        elif sp.is_control(i):
            table.append(b"")  # <s>, </s>: never part of encoded text
        else:
            table.append(piece.replace("\u2581", " ").encode("utf-8"))
    return table


def _steps(spec: dict | None) -> list[dict]:
    """A decoder or pre-tokenizer spec as a flat list of its steps."""
    if not spec:
        return []
    if spec["type"] == "Sequence":
        return [d for sub in spec.get("decoders", spec.get("pretokenizers", [])) for d in _steps(sub)]
    return [spec]


def _hf_table(backend) -> list[bytes]:
    spec = json.loads(backend.to_str())
    model = spec["model"]
    steps = _steps(spec.get("decoder")) + _steps(spec.get("pre_tokenizer"))
    types = {d["type"] for d in steps}
    vocab = backend.get_vocab(with_added_tokens=False)
    added = backend.get_added_tokens_decoder()
    table = [b""] * (max(list(vocab.values()) + list(added)) + 1)

    if "ByteLevel" in types:
        byte_of = {ch: b for b, ch in _bytes_to_unicode().items()}
        for token, i in vocab.items():
            try:
                table[i] = bytes(byte_of[ch] for ch in token)
            except KeyError:  # not in the byte alphabet: a plain-text token
                table[i] = token.encode("utf-8")
    elif model["type"] == "WordPiece" or "WordPiece" in types:
        prefix = model.get("continuing_subword_prefix") or "##"
        for token, i in vocab.items():
            # "##ing" continues a word; a word-initial token is preceded by whitespace the
            # pre-tokenizer dropped, which place_tokens gives back from the text.
            table[i] = (token[len(prefix) :] if token.startswith(prefix) else token).encode("utf-8")
    else:  # SentencePiece-style: a space marker, maybe byte-fallback pieces
        marker = next((d.get("replacement") for d in steps if d["type"] == "Metaspace"), None)
        marker = (
            marker
            or next(
                (d["pattern"].get("String") for d in steps if d["type"] == "Replace" and d.get("content") == " "), None
            )
            or "\u2581"
        )
        byte_fallback = bool(model.get("byte_fallback")) or "ByteFallback" in types
        for token, i in vocab.items():
            match = _BYTE_PIECE.match(token) if byte_fallback else None
            table[i] = bytes([int(match.group(1), 16)]) if match else token.replace(marker, " ").encode("utf-8")
    for i, tok in added.items():  # special and added tokens are spelled as their text
        table[i] = tok.content.encode("utf-8")
    return table


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(keep)
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


# ---------------------------------------------------------------------------------------------
# Placing tokens on their text


@dataclass
class Placement:
    """Where each token of one tokenization lies in the UTF-8 bytes of its text.

    Spans are in order and do not overlap. `exact[k]` is True when token k spells exactly
    text[start:end] (leading whitespace the pre-tokenizer dropped belongs to the next token).
    """

    start: np.ndarray  # int64 [n]
    end: np.ndarray  # int64 [n]
    exact: np.ndarray  # bool [n]

    def token_bytes(self, data: bytes, pieces: Sequence[bytes]) -> list[bytes]:
        """Each token's exact bytes: its text span where exact, its own spelling otherwise."""
        return [
            data[s:e] if ok else p
            for s, e, ok, p in zip(self.start.tolist(), self.end.tolist(), self.exact.tolist(), pieces)
        ]


def place_tokens(text: str, pieces: Sequence[bytes], offsets: Sequence[tuple[int, int]] | None = None) -> Placement:
    """Lays token bytes `pieces` (from `token_byte_table`) over `text`.

    Tokens are matched against the text in order. A leading space the tokenizer added (the
    SentencePiece dummy prefix) is not part of the text. Where a token does not spell the text
    (lossy normalisation, [UNK]), its character `offsets` (as transformers' `return_offsets_mapping`
    gives them) say where it lies, so later tokens stay in place; without offsets the rest of the
    text cannot be placed and is marked inexact.
    """
    data = text.encode("utf-8")
    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    placement = _place_lossless(data, b"".join(pieces), lengths)
    if placement is not None:
        return placement

    n = len(pieces)
    byte_at = _char_to_byte(text) if offsets is not None else None
    start, end, exact = [0] * n, [0] * n, [False] * n
    pos = 0
    for k, piece in enumerate(pieces):
        start[k] = pos
        if data.startswith(piece, pos):
            pos += len(piece)
            exact[k] = True
            end[k] = pos
            continue
        # A leading space may be one the tokenizer added (SentencePiece's dummy prefix, also after
        # special tokens in older Llama tokenizers): the token then spells the rest.
        core = piece[1:] if piece[:1] == b" " else piece
        if byte_at is None:
            if core is not piece and data.startswith(core, pos):
                pos += len(core)
                exact[k] = True
        else:  # trust the tokenizer's offsets; whitespace it dropped before a word is the word's
            b0, b1 = int(byte_at[offsets[k][0]]), int(byte_at[offsets[k][1]])
            gap = data[pos:b0]
            exact[k] = b0 >= pos and (not gap or gap.isspace()) and data[b0:b1] == core
            pos = max(pos, b1)
        end[k] = pos
    return Placement(np.asarray(start, dtype=np.int64), np.asarray(end, dtype=np.int64), np.asarray(exact, dtype=bool))


def _place_lossless(data: bytes, joined: bytes, lengths: np.ndarray) -> Placement | None:
    """The placement when the tokens spell the text end to end (after a possible dummy prefix
    space on the first token), else None."""
    if joined == data:
        end = np.cumsum(lengths)
    elif joined[:1] == b" " and joined[1:] == data and len(lengths) and lengths[0] > 0:
        lengths = lengths.copy()
        lengths[0] -= 1
        end = np.cumsum(lengths)
    else:
        return None
    return Placement(end - lengths, end, np.ones(len(lengths), dtype=bool))


def _char_to_byte(text: str) -> np.ndarray:
    """[len(text) + 1] byte offset of every character offset."""
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    width = 1 + (codepoints >= 0x80) + (codepoints >= 0x800) + (codepoints >= 0x10000)
    return np.concatenate([[0], np.cumsum(width)])


class TokenBytes:
    """One tokenizer's byte table and placement, built once and reused for every text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.table = token_byte_table(tokenizer)
        self.lengths = np.fromiter(map(len, self.table), dtype=np.int64, count=len(self.table))
        self._has_offsets = hasattr(tokenizer, "backend_tokenizer")  # transformers fast tokenizers

    def pieces(self, ids: Sequence[int]) -> list[bytes]:
        table = self.table
        return [table[i] for i in ids]

    def place(self, text: str, ids: Sequence[int], offsets=None) -> Placement:
        """Places the ids of `text` (encoded without added special tokens) on its bytes.

        Lossless tokenizers are placed from their bytes alone. If some token does not spell the
        text, the text is encoded again with offsets (transformers tokenizers) to place the rest.
        """
        if offsets is None:  # the common case first, without building the list of pieces
            joined = b"".join(map(self.table.__getitem__, ids))
            placement = _place_lossless(text.encode("utf-8"), joined, self.lengths[np.asarray(ids, dtype=np.int64)])
            if placement is not None:
                return placement
        pieces = self.pieces(ids)
        placement = place_tokens(text, pieces, offsets)
        if offsets is None and self._has_offsets and not placement.exact.all():
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            if list(encoded["input_ids"]) == list(ids):
                placement = place_tokens(text, pieces, encoded["offset_mapping"])
        return placement

    def token_bytes(self, text: str, ids: Sequence[int], offsets=None) -> list[bytes]:
        """The exact bytes of every token of `text` (concatenated: the text, for a lossless tokenizer)."""
        return self.place(text, ids, offsets).token_bytes(text.encode("utf-8"), self.pieces(ids))


# ---------------------------------------------------------------------------------------------
# Alignment


def align_chunks(
    teacher_token_bytes: Sequence[bytes], student_token_bytes: Sequence[bytes]
) -> list[tuple[int, int, int, int]]:
    """Chunks (t_start, t_end, s_start, s_end) of two tokenizations, in order, non-overlapping.

    Each side's tokens are laid end to end from byte 0. A chunk closes wherever both sides have a
    token boundary at the same byte offset; it is kept only if its bytes are equal on both sides.
    Token ranges are half-open: teacher tokens [t_start, t_end) spell student tokens [s_start, s_end).
    """
    teacher = _laid_end_to_end(teacher_token_bytes)
    student = _laid_end_to_end(student_token_bytes)
    bounds, t_chunk, s_chunk = _candidates(teacher, student)
    same = _same_bytes(bounds, b"".join(teacher_token_bytes), b"".join(student_token_bytes))
    valid = same & _tiled(bounds, t_chunk, teacher) & _tiled(bounds, s_chunk, student)
    t_ids, s_ids, n = _renumber(valid, t_chunk, s_chunk)
    t_first, t_last = _first_last(t_ids, n)
    s_first, s_last = _first_last(s_ids, n)
    return list(zip(t_first.tolist(), (t_last + 1).tolist(), s_first.tolist(), (s_last + 1).tolist()))


def align_spans(teacher: Placement, student: Placement) -> tuple[np.ndarray, np.ndarray, int]:
    """Chunk id per token (int32, -1 = none) for two placements on one byte coordinate, and the count.

    Both placements must use the same coordinates for the same text (e.g. offsets inside one
    message's content). A chunk is kept when both sides' tokens tile it exactly and spell it exactly.
    Chunk ids run 0..n-1 in text order and name the same chunk on both sides.
    """
    bounds, t_chunk, s_chunk = _candidates(teacher, student)
    valid = _tiled(bounds, t_chunk, teacher) & _tiled(bounds, s_chunk, student)
    return _renumber(valid, t_chunk, s_chunk)


def _laid_end_to_end(token_bytes: Sequence[bytes]) -> Placement:
    lengths = np.fromiter(map(len, token_bytes), dtype=np.int64, count=len(token_bytes))
    end = np.cumsum(lengths)
    return Placement(end - lengths, end, np.ones(len(lengths), dtype=bool))


def _candidates(teacher: Placement, student: Placement):
    """Common boundaries (sorted) and, per token, the index of the interval its start falls in."""
    t_bounds, s_bounds = _boundaries(teacher), _boundaries(student)
    at = np.searchsorted(s_bounds, t_bounds).clip(max=max(len(s_bounds) - 1, 0))
    bounds = t_bounds[s_bounds[at] == t_bounds] if len(s_bounds) else s_bounds
    t_chunk = np.searchsorted(bounds, teacher.start, side="right") - 1
    s_chunk = np.searchsorted(bounds, student.start, side="right") - 1
    return bounds, t_chunk, s_chunk


def _boundaries(side: Placement) -> np.ndarray:
    """Sorted distinct byte offsets where a token of this side starts or ends."""
    b = np.concatenate([side.start, side.end])
    b.sort()
    return b[np.concatenate([b[:1] == b[:1], b[1:] != b[:-1]])]


def _tiled(bounds: np.ndarray, chunk: np.ndarray, side: Placement) -> np.ndarray:
    """[n_intervals] bool: the side's tokens in each interval cover it exactly, all spelled exactly."""
    n = len(bounds) - 1
    if n <= 0:
        return np.zeros(0, dtype=bool)
    inside = (chunk >= 0) & (chunk < n)
    c = chunk[inside]
    fits = side.exact[inside] & (side.end[inside] <= bounds[c + 1])
    covered = np.bincount(c, weights=(side.end - side.start)[inside], minlength=n)
    broken = np.bincount(c, weights=~fits, minlength=n)
    return (covered == np.diff(bounds)) & (broken == 0)


def _same_bytes(bounds: np.ndarray, a: bytes, b: bytes) -> np.ndarray:
    """[n_intervals] bool: a and b hold the same bytes on each interval."""
    if len(bounds) < 2:
        return np.zeros(0, dtype=bool)
    n = min(len(a), len(b))
    differs = np.frombuffer(a, dtype=np.uint8, count=n) != np.frombuffer(b, dtype=np.uint8, count=n)
    seen = np.concatenate([[0], np.cumsum(differs)])
    return seen[bounds[1:]] == seen[bounds[:-1]]


def _renumber(valid: np.ndarray, t_chunk: np.ndarray, s_chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Keeps the valid intervals as chunks 0..n-1; tokens elsewhere get -1."""
    n = len(valid)
    new_id = np.append(np.where(valid, np.cumsum(valid) - 1, -1), -1)  # slot n: outside every interval

    def ids(chunk):
        return new_id[np.where((chunk >= 0) & (chunk < n), chunk, n)].astype(np.int32)

    return ids(t_chunk), ids(s_chunk), int(valid.sum())


def _first_last(ids: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last token index of each chunk 0..n-1 (chunk tokens are contiguous)."""
    positions = np.flatnonzero(ids >= 0)
    order = ids[positions]
    first = positions[np.searchsorted(order, np.arange(n), side="left")]
    last = positions[np.searchsorted(order, np.arange(n), side="right") - 1]
    return first, last
