"""Chunk agreement against a direct computation on a tiny student and MoE teacher."""

import pytest
import torch

from tests.tiny import STUDENT_INIT, llada2, word_tokenizer
from tide_ds.config import ModelConfig
from tide_ds.eval.agreement import chunk_agreement
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
