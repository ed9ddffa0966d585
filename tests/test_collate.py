"""The collator: padding to the block size with EOS, maskable positions, chunk ids, teacher padding."""

import numpy as np
import pytest
import torch

from tide_ds.data.collate import Collator

EOS, TEACHER_PAD, BLOCK = 9, 0, 4


def rows():
    return [
        {
            "input_ids": [5, 6, 7, 8, 1],
            "labels": [-100, -100, 7, 8, 1],
            "chunk_ids": [-1, -1, 0, 1, -1],
            "teacher_input_ids": [50, 60, 70, 80],
            "teacher_chunk_ids": [-1, 0, 0, 1],
            "num_chunks": 2,
        },
        {
            "input_ids": np.array([5, 3], dtype=np.int32),
            "labels": np.array([-100, 3], dtype=np.int32),
            "chunk_ids": np.array([-1, 0], dtype=np.int32),
            "teacher_input_ids": np.array([51, 31], dtype=np.int32),
            "teacher_chunk_ids": np.array([-1, 0], dtype=np.int32),
            "num_chunks": 1,
        },
    ]


def test_batch_contract():
    batch = Collator(EOS, BLOCK, TEACHER_PAD)(rows())
    assert set(batch) == {
        "input_ids",
        "maskable",
        "chunk_ids",
        "teacher_input_ids",
        "teacher_chunk_ids",
        "teacher_attention_mask",
        "num_chunks",
    }
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 1, EOS, EOS, EOS], [5, 3, EOS, EOS, EOS, EOS, EOS, EOS]]
    assert batch["maskable"].tolist() == [
        [False, False, True, True, True, True, True, True],
        [False, True, True, True, True, True, True, True],
    ]
    assert batch["chunk_ids"].tolist() == [[-1, -1, 0, 1, -1, -1, -1, -1], [-1, 0, -1, -1, -1, -1, -1, -1]]
    assert batch["teacher_input_ids"].tolist() == [[50, 60, 70, 80], [51, 31, TEACHER_PAD, TEACHER_PAD]]
    assert batch["teacher_chunk_ids"].tolist() == [[-1, 0, 0, 1], [-1, 0, -1, -1]]
    assert batch["teacher_attention_mask"].tolist() == [[True] * 4, [True, True, False, False]]
    assert batch["num_chunks"] == 2 and isinstance(batch["num_chunks"], int)
    for name in ("input_ids", "chunk_ids", "teacher_input_ids", "teacher_chunk_ids"):
        assert batch[name].dtype == torch.long and batch[name].device.type == "cpu"
    assert batch["maskable"].dtype == torch.bool


def test_padding_is_not_maskable_without_train_on_padding():
    batch = Collator(EOS, BLOCK, TEACHER_PAD, train_on_padding=False)(rows())
    assert batch["maskable"].tolist() == [
        [False, False, True, True, True, False, False, False],
        [False, True, False, False, False, False, False, False],
    ]


def test_an_exact_multiple_gets_no_padding():
    batch = Collator(EOS, 5, TEACHER_PAD)(rows()[:1])
    assert batch["input_ids"].shape == (1, 5)


def test_block_size_must_be_positive():
    with pytest.raises(ValueError, match="block size"):
        Collator(EOS, 0, TEACHER_PAD)


def test_block_eos_padding_ends_each_row_at_its_own_block_boundary():
    """eos_padding="block": EOS is maskable only up to the row's next block boundary; the rest of the
    batch's padding is never trained on."""
    rows = [
        {
            "input_ids": [5] * n,
            "labels": [5] * n,
            "chunk_ids": list(range(n)),
            "teacher_input_ids": [1],
            "teacher_chunk_ids": [0],
            "num_chunks": n,
        }
        for n in (3, 9, 4)
    ]
    batch = Collator(2, 4, 0, eos_padding="block")(rows)
    assert batch["input_ids"].shape == (3, 12)
    assert batch["maskable"].sum(1).tolist() == [4, 12, 4]  # 3 -> 4, 9 -> 12, 4 -> 4 (no EOS needed)
    for row, n in zip(batch["maskable"], (3, 9, 4)):
        end = -(-n // 4) * 4
        assert row[:end].all() and not row[end:].any()
    assert (batch["input_ids"][0, 3:] == 2).all()  # the row is still EOS after its boundary, just ignored
    wide = Collator(2, 4, 0)(rows)["maskable"]
    assert wide.all()  # the default: every row's EOS padding up to the batch's longest row
