"""Functional API of the fused ops.

`impl` picks the implementation: "auto" (the CUDA extension for CUDA tensors, the PyTorch twin on
CPU), "twin" (the tiled PyTorch twin anywhere) or "reference" (the plain `tide_ds.objectives`
path, which builds full [N, V] logits).
"""
from __future__ import annotations

import functools
from typing import Callable, Literal

import torch

from tide_ds.kernels import ops, twin
from tide_ds.kernels._ext import cuda_extension
from tide_ds.objectives.calm import calm, chunk_logprobs
from tide_ds.objectives.ce import _fp32, token_logprobs
from tide_ds.objectives.kl import kl, tidal_kl, tidal_lambda, timestep_weighting

Impl = Literal["auto", "twin", "reference"]
IMPLS = ("auto", "twin", "reference")


def _reference(impl: str) -> bool:
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; use one of {', '.join(IMPLS)}")
    return impl == "reference"


def _kernels(t: torch.Tensor, impl: str):
    """The row kernels for tensors like t: the CUDA extension ("auto" on GPU, when it loads) or the twin."""
    if impl == "auto" and t.is_cuda and t.dtype in (torch.float32, torch.float16, torch.bfloat16):
        ext = cuda_extension()
        if ext is not None:
            return ext
    return twin


def _rows(block_rows: int | None, t: torch.Tensor, vocab: int) -> int:
    return block_rows or ops.block_rows(vocab, t.device.type)


def _reference_logits(hidden, weight, bias, lead):
    """Full logits [*lead, V] (the reference path)."""
    return ops._logits(hidden.reshape(-1, hidden.shape[-1]), weight, bias).view(*lead, -1)


def _as_sequences(x: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    """Rows [n, ...] as n sequences of length 1 (how the references take flattened masked rows)."""
    return x.unsqueeze(1) if len(lead) == 1 else x


def target_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    impl: Impl = "auto",
    block_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), logsumexp) per token for logits = (hidden @ weight.T + bias) / temperature,
    without [N, V] logits. hidden [..., H], weight [V, H], targets [...] -> two fp32 tensors [...]."""
    h, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if _reference(impl):
        z = ops._logits(h, weight, bias) / temperature
        logp, lse = token_logprobs(z, y), torch.logsumexp(_fp32(z), dim=-1)
    else:
        logp, lse = ops.TargetLogprobsFunction.apply(h, weight, bias, y, 1.0 / temperature, _kernels(h, impl),
                                                    _rows(block_rows, h, weight.shape[0]))
    return logp.view(targets.shape), lse.view(targets.shape)


def fused_chunk_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_ids: torch.Tensor,
    chunk_mask: torch.Tensor,
    chunk_loss: Callable[[torch.Tensor], torch.Tensor],
    *,
    bias: torch.Tensor | None = None,
    impl: Impl = "auto",
    block_rows: int | None = None,
) -> torch.Tensor:
    """chunk_loss(chunk log-probs [b, C]) with the chunk log-probs summed from per-token target
    log-probs of logits = hidden @ weight.T + bias, without [N, V] logits.

    hidden [b, l, H] (or [b * l, H]), targets [b, l], chunk_ids [b, l] (-1 = no chunk; tokens in
    row-major order, sequence i owning tokens i*l .. i*l + l - 1), chunk_mask [b, C] (active
    chunks). chunk_loss must be separable: each chunk's gradient depends on its own log-prob
    only, inactive chunks get none (e.g. a masked mean of per-chunk terms, like `calm`)."""
    b, num_chunks = chunk_mask.shape
    ids = chunk_ids.reshape(b, -1)
    h, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if _reference(impl):
        logp = token_logprobs(ops._logits(h, weight, bias), y).view(b, -1)
        return chunk_loss(chunk_logprobs(logp, ids, num_chunks))
    offset = torch.arange(b, device=ids.device)[:, None] * num_chunks
    key = torch.where(ids >= 0, ids + offset, -1).reshape(-1)
    return ops.ChunkLossFunction.apply(h, weight, bias, y, key, chunk_mask.bool(), chunk_loss, _kernels(h, impl),
                                       _rows(block_rows, h, weight.shape[0]), torch.is_grad_enabled())


def fused_calm(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_ids: torch.Tensor,
    teacher_chunk_logprobs: torch.Tensor,
    chunk_mask: torch.Tensor,
    *,
    temperature: float = 2.0,
    reverse: bool = True,
    bias: torch.Tensor | None = None,
    impl: Impl = "auto",
    block_rows: int | None = None,
) -> torch.Tensor:
    """(Reverse) CALM straight from hidden states: equals
    `calm(chunk_logprobs(token_logprobs(hidden @ weight.T + bias, targets), chunk_ids, C),
    teacher_chunk_logprobs, chunk_mask, temperature=temperature, reverse=reverse)`.
    Shapes as in `fused_chunk_loss`; teacher_chunk_logprobs [b, C]."""
    loss = functools.partial(calm, teacher_chunk_logprobs=teacher_chunk_logprobs.detach(), chunk_mask=chunk_mask,
                             temperature=temperature, reverse=reverse)
    return fused_chunk_loss(hidden, weight, targets, chunk_ids, chunk_mask, loss, bias=bias, impl=impl,
                            block_rows=block_rows)


def _shared_vocab_term(student, teacher, masked, lam, row_weight, temperature, reverse, impl, block_rows):
    hs, ws, bs = student
    ht, wt, bt = teacher
    lead = hs.shape[:-1]
    masked = torch.ones(lead, dtype=torch.bool, device=hs.device) if masked is None else masked.bool()
    coef = masked.reshape(-1).to(_fp32(hs).dtype) * (temperature**2 / masked.sum().clamp_min(1))
    if row_weight is not None:
        coef = coef * row_weight.reshape(-1)
    h_s, h_t = hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1])
    tb = None if bt is None else bt.detach()
    return ops.KLFunction.apply(h_s, ws, bs, h_t.detach(), wt.detach(), tb, coef,
                                None if lam is None else lam.reshape(-1), temperature, reverse,
                                _kernels(h_s, impl), _rows(block_rows, h_s, min(ws.shape[0], wt.shape[0])),
                                torch.is_grad_enabled())


def fused_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    masked: torch.Tensor | None = None,
    *,
    temperature: float = 2.0,
    reverse: bool = False,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    impl: Impl = "auto",
    block_rows: int | None = None,
) -> torch.Tensor:
    """T^2 * mean over masked positions of KL(p_T || p_S) (or KL(p_S || p_T) with reverse), as
    `tide_ds.objectives.kl`, from hidden states and output projections on the shared id range
    min(V_s, V_t); gradients for the student only.

    student_hidden [b, l, H] or [n, H], teacher_hidden the same with H', weights [V_s, H] and
    [V_t, H'], masked like the hidden's leading dims (None = all)."""
    lead = student_hidden.shape[:-1]
    if _reference(impl):
        zs = _reference_logits(student_hidden, student_weight, student_bias, lead)
        zt = _reference_logits(teacher_hidden, teacher_weight, teacher_bias, lead)
        m = torch.ones(lead, dtype=torch.bool, device=zs.device) if masked is None else masked
        return kl(_as_sequences(zs, lead), _as_sequences(zt, lead), _as_sequences(m, lead),
                  temperature=temperature, reverse=reverse)
    return _shared_vocab_term((student_hidden, student_weight, student_bias),
                              (teacher_hidden, teacher_weight, teacher_bias), masked, None, None, temperature, reverse,
                              impl, block_rows)


def fused_tidal(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    masked: torch.Tensor | None,
    t: torch.Tensor,
    progress: float,
    *,
    lambda_init: float = 0.1,
    lambda_max: float = 0.9,
    schedule: Literal["cosine", "linear"] = "cosine",
    axis: Literal["both", "training_only", "timestep_only"] = "both",
    timestep_weight: Literal["midrange", "uniform"] = "midrange",
    temperature: float = 2.0,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    impl: Impl = "auto",
    block_rows: int | None = None,
) -> torch.Tensor:
    """TIDAL as `tide_ds.objectives.tidal_kl`, from hidden states and output projections.

    student_hidden [b, l, H] with masked [b, l] and t [b], or masked rows [n, H] with masked [n]
    (or None) and t [n]; weights and biases as in `fused_kl`."""
    lead = student_hidden.shape[:-1]
    if _reference(impl):
        zs = _reference_logits(student_hidden, student_weight, student_bias, lead)
        zt = _reference_logits(teacher_hidden, teacher_weight, teacher_bias, lead)
        m = torch.ones(lead, dtype=torch.bool, device=zs.device) if masked is None else masked
        return tidal_kl(_as_sequences(zs, lead), _as_sequences(zt, lead), _as_sequences(m, lead), t, progress,
                        lambda_init=lambda_init, lambda_max=lambda_max, schedule=schedule, axis=axis,
                        timestep_weight=timestep_weight, temperature=temperature)
    t32 = _fp32(t)
    lam = tidal_lambda(t32, progress, lambda_init=lambda_init, lambda_max=lambda_max, schedule=schedule, axis=axis)
    w = timestep_weighting(t32, timestep_weight)
    per_row = lambda x: x.reshape(x.shape + (1,) * (len(lead) - x.dim())).expand(lead)  # noqa: E731
    return _shared_vocab_term((student_hidden, student_weight, student_bias),
                              (teacher_hidden, teacher_weight, teacher_bias), masked, per_row(lam), per_row(w),
                              temperature, False, impl, block_rows)
