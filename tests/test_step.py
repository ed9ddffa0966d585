import torch

from tide_ds.config import ObjectiveConfig
from tide_ds.objectives import RECIPES
from tide_ds.pipeline import DistillStep


class PassRecorder(torch.nn.Module):
    """A stand-in teacher: its hidden state at each position is the input id it saw (as a float)."""

    mask_token_id = 99

    def __init__(self):
        super().__init__()
        self.inputs = []
        self.output_weight = torch.eye(100)
        self.output_bias = None

    def hidden_states(self, input_ids, attention_mask=None, x0=None):
        self.inputs.append(input_ids.clone())
        return torch.nn.functional.one_hot(input_ids, 100).float()


class Student:
    mask_token_id = 98


def cross_batch():
    # student tokens 0..9, teacher tokens 0..7; chunks 0..3 aligned across both (-1 = prompt/none)
    return {
        "input_ids": torch.arange(10).repeat(2, 1),
        "maskable": torch.tensor([[0, 0] + [1] * 8] * 2, dtype=torch.bool),
        "chunk_ids": torch.tensor([[-1, -1, 0, 0, 1, 2, 2, 2, 3, -1]] * 2),
        "teacher_input_ids": torch.arange(10, 18).repeat(2, 1),
        "teacher_chunk_ids": torch.tensor([[-1, 0, 1, 1, 2, 3, 3, -1]] * 2),
        "num_chunks": 4,
    }


def test_chunk_consistent_masking_on_both_sides():
    teacher = PassRecorder()
    step = DistillStep(Student(), teacher, RECIPES["tide_cross"], ObjectiveConfig(), cross_tokenizer=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        batch = cross_batch()
        n = step.noise(batch, generator=gen)
        assert not n.masked[:, :2].any()  # prompt
        (teacher_in,) = n.teacher_pass_inputs
        t_masked = teacher_in == 99
        for row in range(2):
            for c in range(4):
                s_tok = n.masked[row][batch["chunk_ids"][row] == c]
                t_tok = t_masked[row][batch["teacher_chunk_ids"][row] == c]
                assert s_tok.all() == s_tok.any() == t_tok.all() == t_tok.any() == bool(n.chunk_mask[row, c])
            assert not t_masked[row][batch["teacher_chunk_ids"][row] == -1].any()


def test_compdemo_through_the_step():
    teacher = PassRecorder()
    step = DistillStep(Student(), teacher, RECIPES["tide_shared"], ObjectiveConfig(), cross_tokenizer=True)
    gen = torch.Generator().manual_seed(1)
    batch = cross_batch()
    n = step.noise(batch, generator=gen)
    pass1, pass2 = n.teacher_pass_inputs
    active_tokens = torch.zeros_like(pass1, dtype=torch.bool)
    for row in range(2):
        for c in range(4):
            if n.chunk_mask[row, c]:
                active_tokens[row] |= batch["teacher_chunk_ids"][row] == c
    m1, m2 = pass1 == 99, pass2 == 99
    assert torch.equal(m1 ^ m2, active_tokens) and not (m1 & m2).any()  # masked in exactly one pass
    assert torch.equal(n.teacher_pass_masked, m1)
    # the student still sees every masked chunk masked
    assert torch.equal(n.x_t == 98, n.masked)
    # each active teacher token's target comes from the pass in which it was masked
    targets = step.teacher_targets(n)
    assert len(teacher.inputs) == 2 and targets.chunk_logprobs is not None
    hidden = torch.where(m1[..., None], torch.nn.functional.one_hot(pass1, 100).float(),
                         torch.nn.functional.one_hot(pass2, 100).float())
    lp = torch.log_softmax(hidden, -1).gather(-1, batch["teacher_input_ids"][..., None])[..., 0]
    want = torch.zeros(2, 4)
    for row in range(2):
        for j, c in enumerate(batch["teacher_chunk_ids"][row].tolist()):
            if c >= 0 and n.chunk_mask[row, c]:
                want[row, c] += lp[row, j]
    assert torch.allclose(targets.chunk_logprobs, want)
