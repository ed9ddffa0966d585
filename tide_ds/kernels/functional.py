"""Functional API of the fused ops.

`impl` picks the implementation: "auto" (the CUDA extension for CUDA tensors, the PyTorch twin on
CPU), "twin" (the tiled PyTorch twin anywhere) or "reference" (the plain `tide_ds.objectives`
path, which builds full [N, V] logits).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Literal

import torch

from tide_ds.kernels import ops, twin
from tide_ds.kernels._ext import cuda_extension
from tide_ds.objectives.calm import calm, chunk_logprobs
from tide_ds.objectives.ce import fp32, token_logprobs
from tide_ds.objectives.kl import kl, kl_per_position, tidal_kl, tidal_lambda, timestep_weighting

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
        logp, lse = token_logprobs(z, y), torch.logsumexp(fp32(z), dim=-1)
    else:
        logp, lse = ops.TargetLogprobsFunction.apply(
            h, weight, bias, y, 1.0 / temperature, _kernels(h, impl), _rows(block_rows, h, weight.shape[0])
        )
    return logp.view(targets.shape), lse.view(targets.shape)


def fused_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor | None,
    logprob_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    groups: torch.Tensor | None = None,
    num_groups: int = 0,
    kl: ops.KLRows | None = None,
    bias: torch.Tensor | None = None,
    impl: Impl = "auto",
    block_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A whole loss on a set of rows from one tiled pass over the output projection:
    logprob_loss(log p(targets)) + sum_n kl.coef[n] * KL_n, with logits = hidden @ weight.T + bias.

    hidden [N, H], weight [V, H], targets [N] (may be None without logprob_loss). logprob_loss maps
    the fp32 target log-probs [N] to a scalar and must be separable by group (groups [N] in
    [0, num_groups), -1 = a group of its own; None = every row its own group): a row's gradient
    may depend only on the log-probs of its own group, as CE (per row) plus CALM or chunk TIDAL
    (per chunk, with a normaliser that does not depend on the log-probs) are. kl: a
    shared-vocabulary term (`kl_rows`). Returns (loss, log-probs [N], KL per row [N] or None);
    only the loss carries gradients (for hidden, weight, bias), computed during the forward."""
    n = hidden.shape[0]
    if logprob_loss is None and kl is None:
        raise ValueError("fused_head_loss: nothing to compute; give logprob_loss, kl or both")
    if hidden.dim() != 2:
        raise ValueError(f"fused_head_loss: hidden must be rows [N, H], got shape {tuple(hidden.shape)}")
    if logprob_loss is not None and (targets is None or targets.shape != (n,)):
        raise ValueError(f"fused_head_loss: logprob_loss needs targets [N] = [{n}]")
    if groups is not None and (groups.shape != (n,) or num_groups <= 0):
        raise ValueError(f"fused_head_loss: groups must be [N] = [{n}] with num_groups > 0")
    if kl is not None and (kl.hidden.shape[0] != n or kl.coef.shape != (n,)):
        raise ValueError(f"fused_head_loss: kl.hidden and kl.coef must have the student's {n} rows")
    if kl is not None:
        kl = dataclasses.replace(
            kl, hidden=kl.hidden.detach(), weight=kl.weight.detach(), bias=None if kl.bias is None else kl.bias.detach()
        )
    if _reference(impl):
        z = ops._logits(hidden, weight, bias)
        if logprob_loss is None:
            logp = z.new_zeros(z.shape[0], dtype=fp32(z).dtype)
            loss = logp.new_zeros(())
        else:
            logp = token_logprobs(z, targets)
            loss = logprob_loss(logp)
        kl_vals = None
        if kl is not None:
            zt = ops._logits(kl.hidden, kl.weight, kl.bias)
            kl_vals = kl_per_position(z, zt, temperature=kl.temperature, reverse=kl.reverse, lam=kl.lam)
            loss = loss + (fp32(kl.coef) * kl_vals).sum()
        return loss, logp.detach(), None if kl_vals is None else kl_vals.detach()
    return ops.HeadLossFunction.apply(
        hidden,
        weight,
        bias,
        targets,
        logprob_loss,
        groups,
        num_groups,
        kl,
        _kernels(hidden, impl),
        _rows(block_rows, hidden, weight.shape[0]),
        torch.is_grad_enabled(),
    )


def kl_rows(
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    masked: torch.Tensor | None = None,
    *,
    temperature: float = 2.0,
    reverse: bool = False,
    lam: torch.Tensor | None = None,
    row_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
) -> ops.KLRows:
    """A KL (or, with lam [n], TIDAL) term over n rows for `fused_head_loss`: T^2 times the mean
    over masked rows [n] (None = all) of row_weight [n] (None = 1) times each row's KL."""
    if reverse and lam is not None:
        raise ValueError("kl_rows: TIDAL (lam) is a forward KL; reverse=True takes no lam")
    n = teacher_hidden.shape[0]
    masked = torch.ones(n, dtype=torch.bool, device=teacher_hidden.device) if masked is None else masked.bool()
    coef = masked.to(fp32(teacher_hidden).dtype) * (temperature**2 / masked.sum().clamp_min(1))
    if row_weight is not None:
        coef = coef * row_weight
    return ops.KLRows(teacher_hidden, teacher_weight, teacher_bias, coef, lam, temperature, reverse)


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
    # Only tokens of active chunks enter the loss: compact to them (a host sync sizes the work).
    rows = ((key >= 0) & chunk_mask.reshape(-1).bool()[key.clamp_min(0)]).nonzero().squeeze(1)

    def logprob_loss(lp):
        token_lp = lp.new_zeros(y.shape).index_put((rows,), lp).view(b, -1)
        return chunk_loss(chunk_logprobs(token_lp, ids, num_chunks))

    loss, _, _ = fused_head_loss(
        h[rows],
        weight,
        y[rows],
        logprob_loss,
        groups=key[rows],
        num_groups=b * num_chunks,
        bias=bias,
        impl=impl,
        block_rows=block_rows,
    )
    return loss


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
    loss = functools.partial(
        calm,
        teacher_chunk_logprobs=teacher_chunk_logprobs.detach(),
        chunk_mask=chunk_mask,
        temperature=temperature,
        reverse=reverse,
    )
    return fused_chunk_loss(
        hidden, weight, targets, chunk_ids, chunk_mask, loss, bias=bias, impl=impl, block_rows=block_rows
    )


def _shared_vocab_term(student, teacher, masked, lam, row_weight, temperature, reverse, impl, block_rows):
    """fused_kl / fused_tidal: compacted to the rows that count (a host sync sizes the work)."""
    hs, ws, bs = student
    ht, wt, bt = teacher
    flat = lambda x: None if x is None else x.reshape(-1)  # noqa: E731
    kl = kl_rows(
        ht.reshape(-1, ht.shape[-1]),
        wt,
        flat(masked),
        temperature=temperature,
        reverse=reverse,
        lam=flat(lam),
        row_weight=flat(row_weight),
        teacher_bias=bt,
    )
    live = (kl.coef != 0).nonzero().squeeze(1)
    kl = dataclasses.replace(kl, hidden=kl.hidden[live], coef=kl.coef[live], lam=None if lam is None else kl.lam[live])
    loss, _, _ = fused_head_loss(
        hs.reshape(-1, hs.shape[-1])[live], ws, None, kl=kl, bias=bs, impl=impl, block_rows=block_rows
    )
    return loss


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
        return kl(
            _as_sequences(zs, lead),
            _as_sequences(zt, lead),
            _as_sequences(m, lead),
            temperature=temperature,
            reverse=reverse,
        )
    return _shared_vocab_term(
        (student_hidden, student_weight, student_bias),
        (teacher_hidden, teacher_weight, teacher_bias),
        masked,
        None,
        None,
        temperature,
        reverse,
        impl,
        block_rows,
    )


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
        return tidal_kl(
            _as_sequences(zs, lead),
            _as_sequences(zt, lead),
            _as_sequences(m, lead),
            t,
            progress,
            lambda_init=lambda_init,
            lambda_max=lambda_max,
            schedule=schedule,
            axis=axis,
            timestep_weight=timestep_weight,
            temperature=temperature,
        )
    t32 = fp32(t)
    lam = tidal_lambda(t32, progress, lambda_init=lambda_init, lambda_max=lambda_max, schedule=schedule, axis=axis)
    w = timestep_weighting(t32, timestep_weight)
    per_row = lambda x: x.reshape(x.shape + (1,) * (len(lead) - x.dim())).expand(lead)  # noqa: E731
    return _shared_vocab_term(
        (student_hidden, student_weight, student_bias),
        (teacher_hidden, teacher_weight, teacher_bias),
        masked,
        per_row(lam),
        per_row(w),
        temperature,
        False,
        impl,
        block_rows,
    )
