"""Batches of prepared rows (from `tide-ds prepare`) as the tensors the training step reads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

IGNORE = -100


class Collator:
    """Pads a list of prepared rows into one batch.

    Returns CPU tensors:
      input_ids               [b, l] long: the student's x0, padded with its EOS up to the longest row
                              rounded up to a multiple of the block size
      maskable                [b, l] bool: response tokens; EOS padding too when train_on_padding
                              (the model learns to end): up to the longest row (eos_padding="batch")
                              or only up to the row's own next block boundary ("block", the paper's;
                              the rest of the row lies in later blocks, which earlier ones never see,
                              and is ignored)
      chunk_ids               [b, l] long: chunk id per student token, -1 = none
      teacher_input_ids       [b, lt] long, padded with the teacher's pad id
      teacher_chunk_ids       [b, lt] long, -1 = none
      teacher_attention_mask  [b, lt] bool, False on padding
      num_chunks              int: the most chunks of any row (ids run 0..n-1 per row)
    """

    def __init__(
        self,
        student_eos_id: int,
        student_pad_to_multiple: int,
        teacher_pad_id: int,
        train_on_padding: bool = True,
        eos_padding: str = "batch",
    ):
        if student_pad_to_multiple < 1:
            raise ValueError(f"student_pad_to_multiple must be >= 1 (the block size), got {student_pad_to_multiple}")
        if eos_padding not in ("batch", "block"):
            raise ValueError(f"eos_padding must be 'batch' or 'block', got {eos_padding!r}")
        self.eos_padding = eos_padding
        self.student_eos_id = student_eos_id
        self.multiple = student_pad_to_multiple
        self.teacher_pad_id = teacher_pad_id
        self.train_on_padding = train_on_padding

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        def column(name):
            return [torch.as_tensor(row[name], dtype=torch.long) for row in rows]

        input_ids, labels, chunk_ids = column("input_ids"), column("labels"), column("chunk_ids")
        longest = max(len(x) for x in input_ids)
        length = -(-longest // self.multiple) * self.multiple
        ids = _pad(input_ids, length, self.student_eos_id)
        is_padding = _pad([torch.zeros(len(x), dtype=torch.bool) for x in input_ids], length, True)
        if self.eos_padding == "block":  # padding past the row's own block boundary is not trained on
            ends = torch.tensor([-(-len(x) // self.multiple) * self.multiple for x in input_ids])
            is_padding &= torch.arange(length)[None, :] < ends[:, None]
        maskable = _pad(labels, length, IGNORE) != IGNORE
        if self.train_on_padding:
            maskable |= is_padding

        teacher_ids = column("teacher_input_ids")
        teacher_length = max(len(x) for x in teacher_ids)
        return {
            "input_ids": ids,
            "maskable": maskable,
            "chunk_ids": _pad(chunk_ids, length, -1),
            "teacher_input_ids": _pad(teacher_ids, teacher_length, self.teacher_pad_id),
            "teacher_chunk_ids": _pad(column("teacher_chunk_ids"), teacher_length, -1),
            "teacher_attention_mask": _pad(
                [torch.ones(len(x), dtype=torch.bool) for x in teacher_ids], teacher_length, False
            ),
            "num_chunks": max(int(row["num_chunks"]) for row in rows),
        }


def _pad(rows: list[torch.Tensor], length: int, value) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=rows[0].dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out
