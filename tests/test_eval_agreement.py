"""Chunk agreement and bits per byte against direct computations on a tiny student and MoE teacher."""

import math

import pytest
import torch

from tests.tiny import STUDENT_INIT, llada2, word_tokenizer
from tide_ds.config import ModelConfig
from tide_ds.eval.agreement import chunk_agreement, chunk_losses, masked_chunks
from tide_ds.models import LLaDA2Teacher, build_student


def test_chunk_agreement_with_everything_masked():
    torch.manual_seed(0)
    student = build_student(ModelConfig(init=STUDENT_INIT), word_tokenizer(), 4, "<|mask|>").eval()
    teacher = LLaDA2Teacher(llada2(seed=1, vocab_size=40, mask_token_id=39), 39)
    x0 = torch.randint(1, 27, (2, 8))
    t_x0 = torch.randint(1, 38, (2, 10))
    # chunk c: student token c (c < 6); teacher tokens 0..3 are chunks 0,0,1,1, then 2..5 one each
    chunk = torch.tensor([0, 1, 2, 3, 4, 5, -1, -1]).expand(2, 8)
    t_chunk = torch.tensor([0, 0, 1, 1, 2, 3, 4, 5, -1, -1]).expand(2, 10)
    batch = {
        "input_ids": x0,
        "maskable": torch.ones_like(x0, dtype=torch.bool),
        "chunk_ids": chunk,
        "teacher_input_ids": t_x0,
        "teacher_chunk_ids": t_chunk,
        "num_chunks": 6,
    }
    got = chunk_agreement(student, teacher, [batch], ratio=1.0)

    with torch.no_grad():
        s_logits = student(torch.full_like(x0, student.mask_token_id), x0).float()
        s_lp = torch.log_softmax(s_logits, -1).gather(-1, x0[..., None])[..., 0][:, :6]
        s_ok = (s_logits.argmax(-1) == x0)[:, :6]
        t_in = torch.where(t_chunk >= 0, 39, t_x0)
        t_logits = (teacher.hidden_states(t_in) @ teacher.output_weight.T).float()
        t_tok = torch.log_softmax(t_logits, -1).gather(-1, t_x0[..., None])[..., 0]
        t_hit = t_logits.argmax(-1) == t_x0
    t_lp = torch.stack([t_tok[:, 0] + t_tok[:, 1], t_tok[:, 2] + t_tok[:, 3]] + [t_tok[:, i] for i in range(4, 8)], 1)
    t_ok = torch.stack([t_hit[:, 0] & t_hit[:, 1], t_hit[:, 2] & t_hit[:, 3]] + [t_hit[:, i] for i in range(4, 8)], 1)
    assert got["chunks"] == 12
    assert got["chunk_gap"] == pytest.approx((s_lp - t_lp).abs().mean().item(), rel=1e-5)
    assert got["chunk_agreement"] == pytest.approx((s_ok == t_ok).float().mean().item())
    assert got["chunk_corr"] == pytest.approx(
        torch.corrcoef(torch.stack([s_lp.flatten(), t_lp.flatten()]))[0, 1].item(), rel=1e-4
    )


class _FixedTeacher:
    """Predicts the same distribution q = (1/2, 1/4, 1/8, 1/8) at every position: log-probs in whole bits."""

    mask_token_id = 3
    output_bias = None

    def __init__(self):
        self.output_weight = torch.eye(4)

    def hidden_states(self, ids, attention_mask=None, x0=None):
        q = torch.tensor([0.5, 0.25, 0.125, 0.125]).log()
        return q.expand(*ids.shape, 4)


def test_bits_per_byte_by_hand():
    """Teacher tokens 0, 1, 2, 3 (1, 2, 4, 8 bytes) in chunks {0, 1}, {2} and none: the masked chunks
    cost 1 + 2 + 3 = 6 bits over 1 + 2 + 4 = 7 bytes, 6 ln 2 nats over 3 tokens; token 3 is in no chunk."""
    batch = {
        "input_ids": torch.tensor([[5, 6]]),
        "maskable": torch.ones(1, 2, dtype=torch.bool),
        "chunk_ids": torch.tensor([[0, 1]]),
        "teacher_input_ids": torch.tensor([[0, 1, 2, 3]]),
        "teacher_chunk_ids": torch.tensor([[0, 0, 1, -1]]),
        "num_chunks": 2,
    }
    got = chunk_losses(_FixedTeacher(), "teacher", [batch], [1.0], torch.tensor([1, 2, 4, 8]))["1"]
    assert got["bpb"] == pytest.approx(6 / 7)
    assert got["nll"] == pytest.approx(6 * math.log(2) / 3)
    assert (got["chunks"], got["bytes"], got["tokens"]) == (2, 7, 3)


def test_bits_per_byte_of_student_and_teacher_on_the_same_chunks():
    """Everything masked: each side's bits per byte is its chunk log-probs over the chunks' bytes
    (counted on the teacher's tokens), its NLL over its own tokens in those chunks."""
    torch.manual_seed(0)
    student = build_student(ModelConfig(init=STUDENT_INIT), word_tokenizer(), 4, "<|mask|>").eval()
    teacher = LLaDA2Teacher(llada2(seed=1, vocab_size=40, mask_token_id=39), 39)
    x0, t_x0 = torch.randint(1, 27, (2, 8)), torch.randint(1, 38, (2, 10))
    chunk = torch.tensor([0, 1, 2, 3, 4, 5, -1, -1]).expand(2, 8)
    t_chunk = torch.tensor([0, 0, 1, 1, 2, 3, 4, 5, -1, -1]).expand(2, 10)
    batch = {
        "input_ids": x0,
        "maskable": torch.ones_like(x0, dtype=torch.bool),
        "chunk_ids": chunk,
        "teacher_input_ids": t_x0,
        "teacher_chunk_ids": t_chunk,
        "num_chunks": 6,
    }
    lengths = torch.arange(40) % 3 + 1
    s_got = chunk_losses(student, "student", [batch], [1.0], lengths)["1"]
    t_got = chunk_losses(teacher, "teacher", [batch], [1.0], lengths)["1"]

    with torch.no_grad():
        s_logits = student(torch.full_like(x0, student.mask_token_id), x0).float()
        s_nats = -torch.log_softmax(s_logits, -1).gather(-1, x0[..., None])[..., 0][:, :6].sum().item()
        t_in = torch.where(t_chunk >= 0, 39, t_x0)
        t_logits = (teacher.hidden_states(t_in) @ teacher.output_weight.T).float()
        t_nats = -torch.log_softmax(t_logits, -1).gather(-1, t_x0[..., None])[..., 0][:, :8].sum().item()
    nbytes = lengths[t_x0[:, :8]].sum().item()
    assert s_got["bytes"] == t_got["bytes"] == nbytes
    assert s_got["bpb"] == pytest.approx(s_nats / math.log(2) / nbytes, rel=1e-5)
    assert t_got["bpb"] == pytest.approx(t_nats / math.log(2) / nbytes, rel=1e-5)
    assert s_got["nll"] == pytest.approx(s_nats / 12, rel=1e-5)
    assert t_got["nll"] == pytest.approx(t_nats / 16, rel=1e-5)


def test_the_draw_does_not_depend_on_the_model():
    """masked_chunks is what makes every model's row use the same chunks: a function of batch, ratio, seed."""
    x0 = torch.randint(1, 27, (3, 16))
    batch = {"input_ids": x0, "maskable": torch.ones_like(x0, dtype=torch.bool), "num_chunks": 16}
    batch["chunk_ids"] = torch.arange(16).expand(3, 16)
    a = masked_chunks(batch, 0.5, torch.Generator().manual_seed(7))
    b = masked_chunks(batch, 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and 0 < int(a[1].sum()) < 48
