"""Shared-vocabulary terms: forward / reverse KL and TIDAL, all at temperature T, times T^2, in fp32."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from tide_ds.objectives.ce import fp32


def shared_vocab(student_logits: torch.Tensor, teacher_logits: torch.Tensor):
    """Cuts both logits to the shared id range (shared ids, different vocab sizes)."""
    v = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return student_logits[..., :v], teacher_logits[..., :v]


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities; 0 * log 0 taken as 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def _masked_mean(values: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    values = torch.where(masked, values, torch.zeros_like(values))
    return values.sum() / masked.sum().clamp_min(1)


def kl_per_position(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 2.0,
    reverse: bool = False,
    lam: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL at temperature T per position, on the shared id range (no T^2 factor): KL(p_T || p_S),
    KL(p_S || p_T) with reverse, or with lam (broadcast over the leading dims) TIDAL's
    KL(r || p_S), r = stopgrad softmax(((1 - lam) z_s + lam z_T) / T)."""
    zs, zt = shared_vocab(fp32(student_logits), fp32(teacher_logits).detach())
    log_s = F.log_softmax(zs / temperature, dim=-1)
    if lam is not None:
        lam = fp32(lam).to(zs.dtype)[..., None]
        return _kl_rows(F.log_softmax(((1 - lam) * zs.detach() + lam * zt) / temperature, dim=-1), log_s)
    log_t = F.log_softmax(zt / temperature, dim=-1)
    return _kl_rows(log_s, log_t) if reverse else _kl_rows(log_t, log_s)


def kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    masked: torch.Tensor,
    *,
    temperature: float = 2.0,
    reverse: bool = False,
) -> torch.Tensor:
    """T^2 * mean over masked positions of KL(p_T || p_S) (forward) or KL(p_S || p_T) (reverse)."""
    per_pos = kl_per_position(student_logits, teacher_logits, temperature=temperature, reverse=reverse)
    return temperature**2 * _masked_mean(per_pos, masked)


def tidal_lambda(
    t: torch.Tensor,
    progress: float,
    *,
    lambda_init: float = 0.1,
    lambda_max: float = 0.9,
    schedule: Literal["cosine", "linear"] = "cosine",
    axis: Literal["both", "training_only", "timestep_only"] = "both",
) -> torch.Tensor:
    """How much to trust the teacher: grows with training progress, shrinks with the mask ratio t."""
    if schedule == "cosine":
        g = (1.0 - math.cos(math.pi * progress)) / 2.0
    elif schedule == "linear":
        g = progress
    else:
        raise ValueError(f"unknown TIDAL schedule {schedule!r}; use cosine or linear")
    lam_train = lambda_init + (lambda_max - lambda_init) * g
    if axis == "both":
        return lam_train * (1.0 - t)
    if axis == "training_only":
        return torch.full_like(t, lam_train)
    if axis == "timestep_only":
        return lambda_max * (1.0 - t)
    raise ValueError(f"unknown TIDAL axis {axis!r}; use both, training_only or timestep_only")


def timestep_weighting(t: torch.Tensor, kind: Literal["midrange", "uniform"] = "midrange") -> torch.Tensor:
    """w_mid(t) = exp(-(t - 0.5)^2 / (2 * 0.15^2)), or 1."""
    if kind == "midrange":
        return torch.exp(-((t - 0.5) ** 2) / (2 * 0.15**2))
    if kind == "uniform":
        return torch.ones_like(t)
    raise ValueError(f"unknown timestep weight {kind!r}; use midrange or uniform")


def tidal_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    masked: torch.Tensor,
    t: torch.Tensor,
    progress: float,
    *,
    lambda_init: float = 0.1,
    lambda_max: float = 0.9,
    schedule: Literal["cosine", "linear"] = "cosine",
    axis: Literal["both", "training_only", "timestep_only"] = "both",
    timestep_weight: Literal["midrange", "uniform"] = "midrange",
    temperature: float = 2.0,
) -> torch.Tensor:
    """T^2 * (1/|M|) * sum_{i in M} w(t) KL(r_i || softmax(z_s / T)), r = stopgrad softmax(mix / T).

    logits [b, l, V], masked [b, l], t [b]; mix = (1 - lambda) z_s + lambda z_T.
    """
    t = fp32(t)
    lam = tidal_lambda(t, progress, lambda_init=lambda_init, lambda_max=lambda_max, schedule=schedule, axis=axis)
    per_pos = kl_per_position(student_logits, teacher_logits, temperature=temperature, lam=lam[:, None])
    w = timestep_weighting(t, timestep_weight)[:, None]
    return temperature**2 * _masked_mean(w * per_pos, masked)
