"""Small modules over the functional API (the output projection's weight is passed in, so the
module holds no parameters and works with any lm_head, sharded or not)."""

from __future__ import annotations

from torch import nn

from tide_ds.kernels.functional import Impl, fused_calm, fused_kl


class FusedCALMLoss(nn.Module):
    """(Reverse) CALM from hidden states and the output projection, without [N, V] logits.

    Shape:
        - hidden: [b, l, H]; weight: [V, H]; bias: [V] or None
        - targets, chunk_ids: [b, l] (chunk id -1 = no chunk)
        - teacher_chunk_logprobs, chunk_mask: [b, C]
        - output: scalar

    Examples::
        >>> loss_fn = FusedCALMLoss(temperature=2.0, reverse=True)
        >>> loss = loss_fn(hidden, lm_head.weight, targets, chunk_ids, teacher_chunk_logprobs, chunk_mask)
    """

    def __init__(
        self, temperature: float = 2.0, reverse: bool = True, impl: Impl = "auto", block_rows: int | None = None
    ):
        super().__init__()
        self.temperature, self.reverse, self.impl, self.block_rows = temperature, reverse, impl, block_rows

    def forward(self, hidden, weight, targets, chunk_ids, teacher_chunk_logprobs, chunk_mask, bias=None):
        return fused_calm(
            hidden,
            weight,
            targets,
            chunk_ids,
            teacher_chunk_logprobs,
            chunk_mask,
            temperature=self.temperature,
            reverse=self.reverse,
            bias=bias,
            impl=self.impl,
            block_rows=self.block_rows,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reverse={self.reverse}, impl={self.impl!r}"


class FusedKLLoss(nn.Module):
    """T^2 * KL between teacher and student distributions on their shared id range, from hidden
    states and output projections (student gradients only), without [N, V] logits.

    Shape:
        - student_hidden: [b, l, H] or [n, H]; student_weight: [V_s, H]
        - teacher_hidden: [b, l, H'] or [n, H']; teacher_weight: [V_t, H']
        - masked: like the hidden's leading dims, or None (all)
        - output: scalar

    Examples::
        >>> loss_fn = FusedKLLoss(temperature=2.0)
        >>> loss = loss_fn(h_student, student.lm_head.weight, h_teacher, teacher.lm_head.weight)
    """

    def __init__(
        self, temperature: float = 2.0, reverse: bool = False, impl: Impl = "auto", block_rows: int | None = None
    ):
        super().__init__()
        self.temperature, self.reverse, self.impl, self.block_rows = temperature, reverse, impl, block_rows

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, masked=None):
        return fused_kl(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            masked,
            temperature=self.temperature,
            reverse=self.reverse,
            impl=self.impl,
            block_rows=self.block_rows,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reverse={self.reverse}, impl={self.impl!r}"
