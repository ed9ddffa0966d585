"""Tiled forward/backward functions of the fused ops, and their thin autograd.Functions.

Logits exist one token block at a time: z = h[block] W^T + bias, [R, V], never [N, V]. The row
kernels (`kernels` argument: `tide_ds.kernels.twin` or the CUDA extension, same interface) do the
elementwise work on a block; the matrix products are plain `torch` calls.

- `target_logprobs`: the gradient is unknown in the forward, so the backward recomputes each block
  (one product more than the plain path).
- chunk losses (CALM) and shared-vocabulary terms (KL, TIDAL): the gradient is computed inside the
  forward, block by block, as fused linear cross-entropy kernels do, so they need no more products
  than the plain path; the backward only rescales. A token's chunk-term gradient needs its whole
  chunk: tokens whose chunk ends in their own block (or earlier) get it at once; the few whose chunk
  runs past the end of their block are finished after the last block (their logits recomputed).
"""
from __future__ import annotations

from typing import Callable

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
        if self.dh is not None:
            if isinstance(rows, slice):
                self.dh[rows] = dz @ self.weight
            else:
                self.dh.index_copy_(0, rows, dz @ self.weight)
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
        raise RuntimeError("tide_ds.kernels: a fused loss computes its gradients in the forward and "
                           "supports one backward per forward (recompute the loss instead of retain_graph)")
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
        grads = target_logprobs_backward(hidden, weight, bias, targets, ctx.scale, lse, grad_logp, grad_lse,
                                         ctx.needs_input_grad[:3], ctx.kernels, ctx.rows)
        return (*grads, None, None, None, None)


# ---------------------------------------------------------------- chunk losses (CALM)


def _value_and_grad(chunk_loss: Callable[[torch.Tensor], torch.Tensor], chunk_logp: torch.Tensor):
    with torch.enable_grad():
        x = chunk_logp.detach().requires_grad_()
        loss = chunk_loss(x)
        (g,) = torch.autograd.grad(loss, x, allow_unused=True)
    return loss.detach(), torch.zeros_like(x) if g is None else g


def chunk_loss_forward(hidden, weight, bias, targets, chunk_key, chunk_active, chunk_loss, need, kernels, rows):
    """A separable chunk loss and its gradients (computed here, in the forward).

    hidden [N, H], targets [N]; chunk_key [N]: each token's index into the flattened chunk table
    (-1 = none); chunk_active: that table [b, C] (bool). chunk_loss maps chunk log-probs [b, C] to a
    scalar in which each chunk's gradient depends on its own log-prob only (and inactive chunks
    have none), e.g. a masked mean of per-chunk terms whose normaliser does not depend on them.
    Returns (loss, (dh, dW, db))."""
    flat_active = chunk_active.reshape(-1)
    chunk_logp = hidden.new_zeros(chunk_active.shape, dtype=_acc_dtype(hidden))
    flat_logp = chunk_logp.view(-1)
    # Only tokens of active chunks enter the loss: compact to them (a host sync sizes the work).
    in_chunk = chunk_key >= 0
    token_rows = (in_chunk & flat_active[chunk_key.clamp_min(0)]).nonzero().squeeze(1)
    n = token_rows.numel()
    h, y, key = hidden[token_rows], targets[token_rows], chunk_key[token_rows]
    pos = torch.arange(n, device=hidden.device)
    last = torch.full_like(flat_active, -1, dtype=pos.dtype).scatter_reduce_(0, key, pos, "amax")
    ready = last[key] < (pos // rows + 1) * rows  # the token's chunk ends inside its block (or earlier)
    lse = flat_logp.new_empty(n)
    grads = _Grads(hidden, weight, bias, need) if any(need) else None
    for s in range(0, n, rows):
        e = min(s + rows, n)
        z = _logits(h[s:e], weight, bias)
        lse[s:e], tgt = kernels.lse_target(z, y[s:e], 1.0)
        flat_logp.index_add_(0, key[s:e], tgt - lse[s:e])
        if grads is not None:
            _, g_chunk = _value_and_grad(chunk_loss, chunk_logp)
            g = torch.where(ready[s:e], g_chunk.view(-1)[key[s:e]], 0.0)
            kernels.logit_grad_(z, y[s:e], lse[s:e], g, -g, 1.0)
            grads.add(token_rows[s:e], h[s:e], z)
    loss, g_chunk = _value_and_grad(chunk_loss, chunk_logp)
    if grads is None:
        return loss, (None, None, None)
    # Tokens whose chunk ran past the end of their block: finish them now that every chunk is complete.
    g = g_chunk.view(-1)[key]
    late = (~ready & (g != 0)).nonzero().squeeze(1)
    for s in range(0, late.numel(), rows):
        idx = late[s : s + rows]
        z = _logits(h[idx], weight, bias)
        kernels.logit_grad_(z, y[idx], lse[idx], g[idx], -g[idx], 1.0)
        grads.add(token_rows[idx], h[idx], z)
    return loss, grads.result(weight, bias)


class ChunkLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_key, chunk_active, chunk_loss, kernels, rows, grad_enabled):
        need = tuple(grad_enabled and r for r in ctx.needs_input_grad[:3])
        loss, grads = chunk_loss_forward(hidden, weight, bias, targets, chunk_key, chunk_active, chunk_loss,
                                         need, kernels, rows)
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        return (*_rescaled(ctx, grad_output), *(None,) * 7)


# ---------------------------------------------------------------- shared-vocabulary terms (KL, TIDAL)


def kl_forward(student, teacher, row_coef, lam, temperature, reverse, need, kernels, rows):
    """sum_i row_coef_i * KL_i over the shared vocabulary, and the student's gradients.

    student = (hidden [N, H], weight [Vs, H], bias or None), teacher = (hidden [N, H'], weight
    [Vt, H'], bias or None); row_coef [N] (rows with 0 are skipped); lam [N] or None (see
    `twin.kl_grad_`). Returns (loss, (dh, dW, db)) for the student."""
    hs, ws, bs = student
    ht, wt, bt = teacher
    vocab = min(ws.shape[0], wt.shape[0])
    ws_v, wt_v = ws[:vocab], wt[:vocab]
    bs_v = None if bs is None else bs[:vocab]
    bt_v = None if bt is None else bt[:vocab]
    grads = _Grads(hs, ws, bs, need, vocab) if any(need) else None
    loss = row_coef.new_zeros((), dtype=_acc_dtype(hs))
    live = (row_coef != 0).nonzero().squeeze(1)  # rows that count (a host sync sizes the work)
    for s in range(0, live.numel(), rows):
        idx = live[s : s + rows]
        coef, h = row_coef[idx], hs[idx]
        zs = _logits(h, ws_v, bs_v)
        zt = _logits(ht[idx], wt_v, bt_v)
        kl = kernels.kl_grad_(zs, zt, coef, temperature, None if lam is None else lam[idx], reverse)
        loss += (coef.to(kl.dtype) * kl).sum()
        if grads is not None:
            grads.add(idx, h, zs)
    return loss, (None, None, None) if grads is None else grads.result(ws, bs)


class KLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, row_coef, lam, temperature, reverse, kernels, rows, grad_enabled):
        need = tuple(grad_enabled and r for r in ctx.needs_input_grad[:3])
        loss, grads = kl_forward((hs, ws, bs), (ht, wt, bt), row_coef, lam, temperature, reverse, need,
                                 kernels, rows)
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        return (*_rescaled(ctx, grad_output), *(None,) * 10)
