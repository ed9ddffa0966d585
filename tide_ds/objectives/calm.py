"""Chunk-level likelihood matching (cross-tokenizer): chunk log-probs, (Reverse) CALM, chunk TIDAL.

Chunk probabilities are tempered, s = exp(lS / T) and q = exp(lT / T), clamped to
[1e-7, 1 - 1e-7] in fp32. Reverse CALM, -[s log q + (1 - s) log(1 - q)], has dL/ds = -logit(q):
bounded and set by the frozen teacher alone.
"""

from __future__ import annotations

import torch

from tide_ds.objectives.ce import fp32
from tide_ds.objectives.kl import _masked_mean

CLAMP = 1e-7


def chunk_logprobs(token_logprobs: torch.Tensor, chunk_ids: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """Sums per-token log-probs into chunks. token_logprobs [b, l], chunk_ids [b, l] (-1 = none)
    -> [b, num_chunks]; a chunk with no token sums to 0."""
    b = token_logprobs.shape[0]
    lp = fp32(token_logprobs)
    bucket = (chunk_ids + 1).clamp_min(0)
    lp = torch.where(chunk_ids >= 0, lp, torch.zeros_like(lp))  # tokens outside chunks may hold junk
    out = lp.new_zeros(b, num_chunks + 1).scatter_add(1, bucket, lp)
    return out[:, 1:]


def chunk_prob(chunk_logprob: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.exp(fp32(chunk_logprob) / temperature).clamp(CLAMP, 1 - CLAMP)


def binary_ce(target: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
    """-[target log prob + (1 - target) log(1 - prob)], elementwise."""
    return -(target * torch.log(prob) + (1 - target) * torch.log1p(-prob))


def calm(
    student_chunk_logprobs: torch.Tensor,
    teacher_chunk_logprobs: torch.Tensor,
    chunk_mask: torch.Tensor,
    *,
    temperature: float = 2.0,
    reverse: bool = True,
) -> torch.Tensor:
    """(Reverse) CALM, mean over chunks where chunk_mask is True. Inputs [b, C]."""
    s = chunk_prob(student_chunk_logprobs, temperature)
    q = chunk_prob(teacher_chunk_logprobs.detach(), temperature)
    per_chunk = binary_ce(s, q) if reverse else binary_ce(q, s)
    return _masked_mean(per_chunk, chunk_mask)


def chunk_tidal(
    student_chunk_logprobs: torch.Tensor,
    teacher_chunk_logprobs: torch.Tensor,
    chunk_mask: torch.Tensor,
    lam: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    temperature: float = 2.0,
) -> torch.Tensor:
    """TIDAL over chunks: forward BCE(m, s) with m = stopgrad((1 - lambda) s + lambda q).

    lam and weight are per row [b] (from each sequence's t); mean over active chunks.
    """
    s = chunk_prob(student_chunk_logprobs, temperature)
    q = chunk_prob(teacher_chunk_logprobs.detach(), temperature)
    lam = fp32(lam)[:, None]
    m = ((1 - lam) * s.detach() + lam * q).clamp(CLAMP, 1 - CLAMP)
    per_chunk = binary_ce(m, s)
    if weight is not None:
        per_chunk = per_chunk * fp32(weight)[:, None]
    return _masked_mean(per_chunk, chunk_mask)
