"""Per-token target log-probabilities and the BD3LM cross-entropy term."""

from __future__ import annotations

from typing import Literal

import torch

from tide_ds.diffusion.noise import loss_weight


def fp32(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (float64 stays float64 so gradcheck works)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) = z[target] - logsumexp(z), in fp32. logits [..., V], targets [...]."""
    z = fp32(logits)
    return z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)


def bd3lm_ce(
    token_logprobs: torch.Tensor,
    masked: torch.Tensor,
    maskable: torch.Tensor,
    t: torch.Tensor,
    normalization: Literal["token", "sequence", "batch"] = "token",
) -> torch.Tensor:
    """sum_{i in M} w(t) * -log p(x0_i), normalised by the maskable-token count ("token"), per
    sequence then averaged ("sequence"), or by batch * length ("batch").

    token_logprobs [b, l] (only masked positions are read), masked / maskable [b, l] bool, t [b].
    """
    lp = fp32(token_logprobs)
    nll = torch.where(masked, -lp, torch.zeros_like(lp)) * loss_weight(fp32(t))[:, None]
    if normalization == "token":
        return nll.sum() / maskable.sum().clamp_min(1)
    if normalization == "sequence":
        return (nll.sum(1) / maskable.sum(1).clamp_min(1)).mean()
    if normalization == "batch":
        return nll.sum() / nll.numel()
    raise ValueError(f"unknown CE normalization {normalization!r}; use token, sequence or batch")
