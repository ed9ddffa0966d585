"""The collator: padding to the block size with EOS, maskable positions, chunk ids, teacher padding."""
import numpy as np
import pytest
import torch

from tide_ds.data.collate import Collator

EOS, TEACHER_PAD, BLOCK = 9, 0, 4


def rows():
    return [
        {"input_ids": [5, 6, 7, 8, 1], "labels": [-100, -100, 7, 8, 1], "chunk_ids": [-1, -1, 0, 1, -1],
         "teacher_input_ids": [50, 60, 70, 80], "teacher_chunk_ids": [-1, 0, 0, 1], "num_chunks": 2},
        {"input_ids": np.array([5, 3], dtype=np.int32), "labels": np.array([-100, 3], dtype=np.int32),
         "chunk_ids": np.array([-1, 0], dtype=np.int32), "teacher_input_ids": np.array([51, 31], dtype=np.int32),
         "teacher_chunk_ids": np.array([-1, 0], dtype=np.int32), "num_chunks": 1},
    ]


def test_batch_contract():
    batch = Collator(EOS, BLOCK, TEACHER_PAD)(rows())
    assert set(batch) == {"input_ids", "maskable", "chunk_ids", "teacher_input_ids", "teacher_chunk_ids",
                          "teacher_attention_mask", "num_chunks"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 1, EOS, EOS, EOS], [5, 3, EOS, EOS, EOS, EOS, EOS, EOS]]
    assert batch["maskable"].tolist() == [[False, False, True, True, True, True, True, True],
                                          [False, True, True, True, True, True, True, True]]
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
    assert batch["maskable"].tolist() == [[False, False, True, True, True, False, False, False],
                                          [False, True, False, False, False, False, False, False]]


def test_an_exact_multiple_gets_no_padding():
    batch = Collator(EOS, 5, TEACHER_PAD)(rows()[:1])
    assert batch["input_ids"].shape == (1, 5)


def test_block_size_must_be_positive():
    with pytest.raises(ValueError, match="block size"):
        Collator(EOS, 0, TEACHER_PAD)
