"""One training row from one data row: both tokenizations, labels, chunk ids, truncation.

`RowPreparer` is the function `datasets.map` runs on batches of data rows; `align_row` is the
per-row step (after tokenization) that the alignment benchmark times.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import numpy as np

from tide_ds.align import Placement, TokenBytes, align_spans
from tide_ds.data.chat import PLAIN_TEMPLATE, Rendered, SkipRow, conversation_of, render_pair, render_text

JSON_COLUMN = "__json__"  # JSON sources arrive as each row's raw bytes, parsed here so bad rows are counted
IGNORE = -100


@dataclass
class Side:
    """One tokenizer with its byte table, chat template and length limit."""

    tokenizer: object
    token_bytes: TokenBytes
    template: str
    max_length: int

    @classmethod
    def of(cls, tokenizer, chat_template: str | None, max_length: int) -> Side:
        return cls(tokenizer, TokenBytes(tokenizer), _template(tokenizer, chat_template), max_length)

    @classmethod
    def load(cls, path: str, chat_template: str | None, max_length: int) -> Side:
        tokenizer, token_bytes = _load_tokenizer(path)
        return cls(tokenizer, token_bytes, _template(tokenizer, chat_template), max_length)

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _template(tokenizer, chat_template: str | None) -> str:
    """None: the tokenizer's own template, or the plain one if it has none; "plain"; or Jinja text."""
    if chat_template == "plain" or (chat_template is None and not tokenizer.chat_template):
        return PLAIN_TEMPLATE
    return chat_template or tokenizer.chat_template


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str) -> tuple[object, TokenBytes]:
    """A tokenizer directory and its byte table, loaded once per process (both are read-only here)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    return tokenizer, TokenBytes(tokenizer)


@dataclass
class PreparedRow:
    input_ids: np.ndarray  # int32 [l]
    labels: np.ndarray  # int32 [l], -100 outside response turns
    chunk_ids: np.ndarray  # int32 [l], -1 = none
    teacher_input_ids: np.ndarray  # int32 [lt]
    teacher_chunk_ids: np.ndarray  # int32 [lt]
    num_chunks: int
    response_bytes: int  # response content bytes inside the kept student tokens
    chunk_bytes: int  # bytes covered by chunks
    truncated: bool


def align_row(
    student: Side, s_rendered: Rendered, s_ids: list[int], teacher: Side, t_rendered: Rendered, t_ids: list[int]
) -> PreparedRow:
    """Aligns the response contents of one row, labels the student, truncates both sides."""
    s_place = student.token_bytes.place(s_rendered.text, s_ids)
    t_place = teacher.token_bytes.place(t_rendered.text, t_ids)
    eos_appended = s_rendered.append_eos and student.eos_id is not None
    if eos_appended:  # after the text, spelling none of it, learned as the end of the response
        s_ids = list(s_ids) + [student.eos_id]
        end = s_place.end[-1:] if len(s_place.end) else np.zeros(1, dtype=np.int64)
        s_place = Placement(np.append(s_place.start, end), np.append(s_place.end, end), np.append(s_place.exact, False))

    # Chunks only inside response contents, on coordinates relative to each content's start.
    s_sel, s_local = _inside(s_place, s_rendered.contents)
    t_sel, t_local = _inside(t_place, t_rendered.contents)
    t_chunk_local, s_chunk_local, _ = align_spans(t_local, s_local)
    s_chunks = np.full(len(s_ids), -1, dtype=np.int32)
    t_chunks = np.full(len(t_ids), -1, dtype=np.int32)
    s_chunks[s_sel] = s_chunk_local
    t_chunks[t_sel] = t_chunk_local

    s_ids = np.asarray(s_ids, dtype=np.int32)
    t_ids = np.asarray(t_ids, dtype=np.int32)
    in_response = _starts_inside(s_place.start, s_rendered.responses)
    in_response[-1:] |= eos_appended
    labels = np.where(in_response, s_ids, IGNORE).astype(np.int32)

    if not in_response.any():
        raise SkipRow("no_response_tokens")

    # Truncation. The prompt must fit; the teacher never reads text the student was cut from.
    s_prompt = int(np.argmax(in_response))
    t_prompt = int(np.searchsorted(t_place.start, t_rendered.contents[0][0], side="left"))
    if s_prompt >= student.max_length:
        raise SkipRow("student_prompt_too_long")
    if t_prompt >= teacher.max_length:
        raise SkipRow("teacher_prompt_too_long")
    s_cut = min(len(s_ids), student.max_length)
    t_cut = min(len(t_ids), teacher.max_length)
    truncated = s_cut < len(s_ids) or t_cut < len(t_ids)
    # The teacher reads up to its last token in a chunk both sides keep, as in the paper's runs: what
    # follows has no student counterpart (the template's closing tokens, or text the student lost).
    t_last = _last_token(t_chunks, _kept_chunks(s_chunks, t_chunks, s_cut, t_cut))
    if t_last >= 0 or s_cut < len(s_ids):
        t_cut = min(t_cut, max(t_prompt, t_last + 1))
    kept = _kept_chunks(s_chunks, t_chunks, s_cut, t_cut)
    s_chunks, t_chunks = s_chunks[:s_cut], t_chunks[:t_cut]
    if not kept.all():
        s_chunks, t_chunks = _renumber(s_chunks, kept), _renumber(t_chunks, kept)

    s_lengths = (s_place.end - s_place.start)[:s_cut]
    cut_byte = int(s_place.end[s_cut - 1]) if s_cut else 0
    return PreparedRow(
        input_ids=s_ids[:s_cut],
        labels=labels[:s_cut],
        chunk_ids=s_chunks,
        teacher_input_ids=t_ids[:t_cut],
        teacher_chunk_ids=t_chunks,
        num_chunks=int(kept.sum()),
        response_bytes=sum(max(0, min(e, cut_byte) - s) for s, e in s_rendered.contents),
        chunk_bytes=int(s_lengths[s_chunks >= 0].sum()),
        truncated=truncated,
    )


def _inside(place: Placement, spans: list[tuple[int, int]]) -> tuple[np.ndarray, Placement]:
    """Tokens lying wholly inside the spans, and their placement on span-relative coordinates
    (spans laid one after another, one byte apart so no chunk can run across two of them)."""
    picked, starts, ends = [], [], []
    base = 0
    for lo, hi in spans:
        first = np.searchsorted(place.start, lo, side="left")
        stop = np.searchsorted(place.end, hi, side="right")
        index = np.arange(first, max(first, stop))
        picked.append(index)
        starts.append(place.start[index] - lo + base)
        ends.append(place.end[index] - lo + base)
        base += hi - lo + 1
    index = np.concatenate(picked)
    return index, Placement(np.concatenate(starts), np.concatenate(ends), place.exact[index])


def _starts_inside(starts: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    inside = np.zeros(len(starts), dtype=bool)
    for lo, hi in spans:
        inside |= (starts >= lo) & (starts < hi)
    return inside


def _kept_chunks(s_chunks: np.ndarray, t_chunks: np.ndarray, s_cut: int, t_cut: int) -> np.ndarray:
    """[n] bool: chunks with every token before the cut on both sides."""
    n = int(max(s_chunks.max(initial=-1), t_chunks.max(initial=-1))) + 1
    cut = np.zeros(n, dtype=bool)
    cut[s_chunks[s_cut:][s_chunks[s_cut:] >= 0]] = True
    cut[t_chunks[t_cut:][t_chunks[t_cut:] >= 0]] = True
    return ~cut


def _last_token(chunks: np.ndarray, kept: np.ndarray) -> int:
    """Index of the last token of a kept chunk (-1 if none)."""
    ok = chunks >= 0
    ok[ok] = kept[chunks[ok]]
    hits = np.flatnonzero(ok)
    return int(hits[-1]) if len(hits) else -1


def _renumber(chunks: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Chunk ids after dropping the chunks not kept: the kept ones run 0..n-1 again."""
    new_id = np.append(np.where(kept, np.cumsum(kept) - 1, -1), -1).astype(np.int32)  # slot -1: no chunk
    return new_id[np.where(chunks >= 0, chunks, len(kept))]


# ---------------------------------------------------------------------------------------------
# Batches (the function datasets.map runs)

OUTPUT_COLUMNS = ("input_ids", "labels", "chunk_ids", "teacher_input_ids", "teacher_chunk_ids", "num_chunks")
STAT_COLUMNS = ("skip_reason", "response_bytes", "chunk_bytes", "chunk_tokens", "teacher_chunk_tokens", "truncated")


class RowPreparer:
    """Turns a batch of data rows into prepared rows; skipped rows come back empty with a reason.

    Holds only settings when pickled (for datasets' worker processes); each process loads the
    tokenizers once, on first use.
    """

    def __init__(
        self,
        column: str,
        student: dict,
        teacher: dict,
        loaded: tuple[Side, Side] | None = None,
        supervise: str = "all_turns",
    ):
        self.column = column
        self.supervise = supervise  # "all_turns" or "last_turn" (render_pair)
        self.student_spec, self.teacher_spec = student, teacher  # Side.load keyword arguments
        self._sides = loaded  # sides this process already loaded from those specs

    def __getstate__(self):
        return {**self.__dict__, "_sides": None}

    def sides(self) -> tuple[Side, Side]:
        if self._sides is None:
            self._sides = (Side.load(**self.student_spec), Side.load(**self.teacher_spec))
        return self._sides

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        student, teacher = self.sides()
        size = len(next(iter(batch.values())))
        reasons = [""] * size
        rendered: dict[int, tuple[Rendered, Rendered]] = {}
        for i in range(size):
            try:
                rendered[i] = self._render(_parse_row(batch, i), student, teacher)
            except SkipRow as e:
                reasons[i] = e.reason
        order = list(rendered)
        s_ids = dict(zip(order, student.encode([rendered[i][0].text for i in order])))
        t_ids = dict(zip(order, teacher.encode([rendered[i][1].text for i in order])))

        out = {name: [] for name in OUTPUT_COLUMNS + STAT_COLUMNS}
        for i in range(size):
            row = None
            if i in rendered:
                try:
                    row = align_row(student, rendered[i][0], s_ids[i], teacher, rendered[i][1], t_ids[i])
                except SkipRow as e:
                    reasons[i] = e.reason
            _append(out, row, reasons[i])
        return out

    def _render(self, row: dict, student: Side, teacher: Side) -> tuple[Rendered, Rendered]:
        conversation = conversation_of(row, self.column)
        if isinstance(conversation, str):
            return render_text(conversation), render_text(conversation)
        return render_pair(
            conversation,
            (student.tokenizer, student.template),
            (teacher.tokenizer, teacher.template),
            supervise=self.supervise,
        )


def _parse_row(batch: dict[str, list], i: int) -> dict:
    """Row i of a batch as a dict (JSON sources: decoded and parsed here)."""
    if JSON_COLUMN not in batch:
        return {name: values[i] for name, values in batch.items()}
    try:
        row = json.loads(batch[JSON_COLUMN][i].decode("utf-8").lstrip("\ufeff"))  # a byte-order mark may start a file
    except UnicodeDecodeError:
        raise SkipRow("invalid_utf8") from None
    except json.JSONDecodeError:
        raise SkipRow("invalid_json") from None
    if not isinstance(row, dict):
        raise SkipRow("invalid_json")
    return row


def _append(out: dict[str, list], row: PreparedRow | None, reason: str) -> None:
    empty = np.zeros(0, dtype=np.int32)
    for name in ("input_ids", "labels", "chunk_ids", "teacher_input_ids", "teacher_chunk_ids"):
        out[name].append(getattr(row, name) if row else empty)
    out["num_chunks"].append(row.num_chunks if row else 0)
    out["skip_reason"].append(reason)
    out["response_bytes"].append(row.response_bytes if row else 0)
    out["chunk_bytes"].append(row.chunk_bytes if row else 0)
    out["chunk_tokens"].append(int((row.chunk_ids >= 0).sum()) if row else 0)
    out["teacher_chunk_tokens"].append(int((row.teacher_chunk_ids >= 0).sum()) if row else 0)
    out["truncated"].append(bool(row and row.truncated))
