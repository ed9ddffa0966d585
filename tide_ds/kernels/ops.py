"""Tiled forward/backward functions of the fused ops, and their thin autograd.Functions.

Logits exist one token block at a time: z = h[block] W^T + bias, [R, V], never [N, V]. The row
kernels (`kernels` argument: `tide_ds.kernels.twin` or the CUDA extension, same interface) do the
elementwise work on a block; the matrix products are plain `torch` calls.

- `target_logprobs`: the gradient is unknown in the forward, so the backward recomputes each block
  (one product more than the plain path).
- losses (`head_loss_forward`: a loss of the per-row target log-probs, such as CE plus CALM, plus
  a shared-vocabulary KL / TIDAL term): the gradient is computed inside the forward, block by
  block, as fused linear cross-entropy kernels do, so the whole student loss needs no more products
  than the plain path (logits, dz W, dz^T h); the backward only rescales. A row's chunk-term
  gradient needs its whole chunk: rows whose chunk ends in their own block (or earlier) get it at
  once; the few whose chunk runs past the end of their block are finished after the last block
  (their logits recomputed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# Bytes of one fp32 [R, V] block buffer. The CPU twin holds a few such buffers at once; on GPU the
# CUDA kernels work in place in the logits block, and larger blocks amortise the per-block update
# of the weight gradient.
DEFAULT_BLOCK_BYTES = {"cpu": 48 << 20, "cuda": 512 << 20}


def block_rows(vocab: int, device_type: str = "cpu", budget: int | None = None) -> int:
    """Rows per token block so that one fp32 [R, vocab] buffer fits in `budget` bytes."""
    budget = budget or DEFAULT_BLOCK_BYTES.get(device_type, DEFAULT_BLOCK_BYTES["cpu"])
    return max(1, budget // (4 * max(vocab, 1)))


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)


_MM_OUT_DTYPE: dict[torch.device, bool] = {}


def _mm_out_dtype_works(device: torch.device) -> bool:
    """Whether addmm(fp32 acc, half, half, out_dtype=fp32) works here (CUDA, recent torch); probed once."""
    if device not in _MM_OUT_DTYPE:
        ok = False
        if device.type == "cuda":
            try:
                a = torch.randn(8, 4, device=device, dtype=torch.bfloat16)
                acc = torch.ones(8, 8, device=device)
                torch.addmm(acc, a, a.T, out_dtype=torch.float32, out=acc)
                ok = torch.allclose(acc, 1 + a.float() @ a.float().T, atol=1e-3, rtol=1e-3)
            except (TypeError, RuntimeError):
                ok = False
        _MM_OUT_DTYPE[device] = ok
    return _MM_OUT_DTYPE[device]


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, acc in fp32 (or fp64) while a and b may be half precision."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif _mm_out_dtype_works(acc.device):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class _Grads:
    """Gradients of hidden, weight and bias, filled block by block (weight and bias in fp32)."""

    def __init__(self, hidden, weight, bias, need, vocab: int | None = None):
        need_h, need_w, need_b = need
        self.vocab = weight.shape[0] if vocab is None else vocab
        self.dh = torch.zeros_like(hidden) if need_h else None
        self.dw = weight.new_zeros(weight.shape, dtype=_acc_dtype(weight)) if need_w else None
        self.db = bias.new_zeros(bias.shape, dtype=_acc_dtype(bias)) if need_b and bias is not None else None
        self.weight = weight[: self.vocab]

    def add(self, rows, h: torch.Tensor, dz: torch.Tensor) -> None:
        """Adds a block: rows (slice or index tensor) of hidden, h = hidden[rows], dz = dL/dz [R, vocab]."""
        if self.dh is not None:  # added: a row may come twice (its log-prob gradient finished late)
            if isinstance(rows, slice):
                self.dh[rows] += dz @ self.weight
            else:
                self.dh.index_add_(0, rows, dz @ self.weight)
        if self.dw is not None:
            _accumulate_mm(self.dw[: self.vocab], dz.T, h)
        if self.db is not None:
            self.db[: self.vocab] += dz.sum(0, dtype=self.db.dtype)

    def result(self, weight, bias):
        dw = None if self.dw is None else self.dw.to(weight.dtype)
        db = None if self.db is None else self.db.to(bias.dtype)
        return self.dh, dw, db


def _rescaled(ctx, grad_output: torch.Tensor):
    """The gradients the forward stored, times the upstream scalar gradient. They are rescaled in
    place (no second copy of the weight gradient), so a second backward through the same graph is
    refused rather than answered wrongly."""
    if getattr(ctx, "rescaled", False):
        raise RuntimeError(
            "tide_ds.kernels: a fused loss computes its gradients in the forward and "
            "supports one backward per forward (recompute the loss instead of retain_graph)"
        )
    ctx.rescaled = True
    return tuple(None if g is None else g.mul_(grad_output) for g in ctx.saved_tensors)


# ---------------------------------------------------------------- per-token target log-probs


def target_logprobs_forward(hidden, weight, bias, targets, scale, kernels, rows):
    """(log p(target), logsumexp) per row [N] for z = scale * (hidden W^T + bias)."""
    n = hidden.shape[0]
    lse = hidden.new_empty(n, dtype=_acc_dtype(hidden))
    logp = torch.empty_like(lse)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        lse_b, tgt = kernels.lse_target(_logits(hidden[s:e], weight, bias), targets[s:e], scale)
        lse[s:e] = lse_b
        logp[s:e] = tgt - lse_b
    return logp, lse


def target_logprobs_backward(hidden, weight, bias, targets, scale, lse, grad_logp, grad_lse, need, kernels, rows):
    """Gradients of hidden, weight, bias from dL/dlogp and dL/dlse [N]; logits recomputed per block."""
    grads = _Grads(hidden, weight, bias, need)
    g_t = torch.zeros_like(lse) if grad_logp is None else grad_logp.to(lse.dtype)
    g_p = (torch.zeros_like(lse) if grad_lse is None else grad_lse.to(lse.dtype)) - g_t
    n = hidden.shape[0]
    for s in range(0, n, rows):
        e = min(s + rows, n)
        z = _logits(hidden[s:e], weight, bias)
        kernels.logit_grad_(z, targets[s:e], lse[s:e], g_t[s:e], g_p[s:e], scale)
        grads.add(slice(s, e), hidden[s:e], z)
    return grads.result(weight, bias)


class TargetLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, kernels, rows):
        logp, lse = target_logprobs_forward(hidden, weight, bias, targets, scale, kernels, rows)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.scale, ctx.kernels, ctx.rows = scale, kernels, rows
        return logp, lse

    @staticmethod
    def backward(ctx, grad_logp, grad_lse):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        grads = target_logprobs_backward(
            hidden,
            weight,
            bias,
            targets,
            ctx.scale,
            lse,
            grad_logp,
            grad_lse,
            ctx.needs_input_grad[:3],
            ctx.kernels,
            ctx.rows,
        )
        return (*grads, None, None, None, None)


# ---------------------------------------------------------------- losses with gradients in the forward


@dataclass
class KLRows:
    """A shared-vocabulary term over the rows: sum_n coef[n] * KL_n at `temperature` between the
    student's row n and the teacher's (`twin.kl_grad_`: forward, reverse, or TIDAL when lam [N] is
    given). The teacher side (hidden [N, H'], weight [V_t, H'], bias) gets no gradient; only the
    shared id range min(V_s, V_t) enters the KL."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    coef: torch.Tensor
    lam: torch.Tensor | None = None
    temperature: float = 2.0
    reverse: bool = False


def _value_and_grad(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor):
    with torch.enable_grad():
        x = x.detach().requires_grad_()
        loss = loss_fn(x)
        (g,) = torch.autograd.grad(loss, x, allow_unused=True)
    return loss.detach(), torch.zeros_like(x) if g is None else g


def _ready(groups: torch.Tensor | None, num_groups: int, n: int, rows: int, device: torch.device) -> torch.Tensor:
    """[n] bool: the row's whole group (its chunk) is inside its own block or earlier ones, so its
    log-prob gradient is known when the block is. Rows in no group (-1) are ready at once."""
    if groups is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    pos = torch.arange(n, device=device)
    last = torch.full((num_groups,), -1, dtype=pos.dtype, device=device)
    last.scatter_reduce_(0, groups.clamp_min(0), torch.where(groups >= 0, pos, -1), "amax")
    return (groups < 0) | (last[groups.clamp_min(0)] < (pos // rows + 1) * rows)


def head_loss_forward(hidden, weight, bias, targets, logprob_loss, groups, num_groups, kl, need, kernels, rows):
    """logprob_loss(log p(target) per row) + sum_n kl.coef[n] * KL_n, and the student's gradients
    (computed here, in the forward). Returns (loss, logp [N], kl rows [N] or None, (dh, dW, db)).

    hidden [N, H], weight [V, H], targets [N]. logprob_loss: None, or a map of the fp32 log-probs
    [N] to a scalar that is separable by group: the gradient for row n depends only on the
    log-probs of the rows in its group (groups [N] in [0, num_groups), -1 = a group of its own),
    e.g. CE (per row) plus CALM (per chunk). Rows of a group that runs past the end of their block
    get their log-prob gradient after the last block, their logits recomputed."""
    n = hidden.shape[0]
    acc = _acc_dtype(hidden)
    logp = hidden.new_zeros(n, dtype=acc)
    lse = hidden.new_zeros(n, dtype=acc)
    kl_vals = None if kl is None else hidden.new_zeros(n, dtype=acc)
    # Without a log-prob term only the shared id range is projected; with one, the whole vocabulary.
    width = weight.shape[0]
    if kl is not None:
        shared = min(width, kl.weight.shape[0])
        wt, bt = kl.weight[:shared], None if kl.bias is None else kl.bias[:shared]
        width = width if logprob_loss is not None else shared
    w, b = weight[:width], None if bias is None else bias[:width]
    grads = _Grads(hidden, weight, bias, need, width) if any(need) else None
    ready = (
        _ready(groups, num_groups, n, rows, hidden.device) if logprob_loss is not None and grads is not None else None
    )
    for s in range(0, n, rows):
        e = min(s + rows, n)
        z = _logits(hidden[s:e], w, b)
        g = None
        if logprob_loss is not None:
            lse[s:e], tgt = kernels.lse_target(z, targets[s:e], 1.0)
            logp[s:e] = tgt - lse[s:e]
            if ready is not None:
                g = torch.where(ready[s:e], _value_and_grad(logprob_loss, logp)[1][s:e], 0.0)
        if kl is not None:
            zt = _logits(kl.hidden[s:e], wt, bt)
            kl_vals[s:e] = kernels.kl_grad_(
                z,
                zt,
                kl.coef[s:e],
                kl.temperature,
                None if kl.lam is None else kl.lam[s:e],
                kl.reverse,
                None if g is None else lse[s:e],
                None if g is None else targets[s:e],
                g,
            )
        elif g is not None:
            kernels.logit_grad_(z, targets[s:e], lse[s:e], g, -g, 1.0)
        if grads is not None:
            grads.add(slice(s, e), hidden[s:e], z)
    loss = logp.new_zeros(())
    if logprob_loss is not None:
        value, g = _value_and_grad(logprob_loss, logp)
        loss = loss + value
    if kl is not None:
        loss = loss + (kl.coef.to(acc) * kl_vals).sum()
    if grads is None:
        return loss, logp, kl_vals, (None, None, None)
    if ready is not None and groups is not None:  # rows whose group ran past their block: finish them
        late = (~ready & (g != 0)).nonzero().squeeze(1)
        for s in range(0, late.numel(), rows):
            idx = late[s : s + rows]
            z = _logits(hidden[idx], w, b)
            kernels.logit_grad_(z, targets[idx], lse[idx], g[idx], -g[idx], 1.0)
            grads.add(idx, hidden[idx], z)
    return loss, logp, kl_vals, grads.result(weight, bias)


class HeadLossFunction(torch.autograd.Function):
    """(loss, logp, kl rows) of `head_loss_forward`; only the loss is differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, logprob_loss, groups, num_groups, kl, kernels, rows, grad_enabled):
        need = tuple(grad_enabled and r for r in ctx.needs_input_grad[:3])
        loss, logp, kl_vals, grads = head_loss_forward(
            hidden, weight, bias, targets, logprob_loss, groups, num_groups, kl, need, kernels, rows
        )
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(logp, *([] if kl_vals is None else [kl_vals]))
        return loss, logp, kl_vals

    @staticmethod
    def backward(ctx, grad_output, *_):
        return (*_rescaled(ctx, grad_output), *(None,) * 8)
