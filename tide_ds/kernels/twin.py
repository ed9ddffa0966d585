"""The CPU twin: PyTorch forms of the row kernels in kernels/tide_kernels.cu.

Each function works on one block of logits z [R, V] (any float dtype, fp32 arithmetic) and has
the same name, arguments and results as the compiled CUDA extension, so the tiled ops in
`tide_ds.kernels.ops` run unchanged on either. The formulas follow the plain references in
`tide_ds.objectives` step by step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tide_ds.objectives.ce import fp32


def check_targets(targets: torch.Tensor, vocab: int) -> None:
    """Targets outside [0, vocab) are refused (the CUDA binding checks the same, with the same words)."""
    if targets.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(targets))
    if lo < 0 or hi >= vocab:
        raise ValueError(f"tide kernels: targets must lie in [0, {vocab}), got values in [{lo}, {hi}]")


def lse_target(z: torch.Tensor, targets: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp(scale * z), scale * z[target]) per row, in fp32."""
    check_targets(targets, z.shape[1])
    x = fp32(z)
    if scale != 1.0:
        x = x * scale
    return torch.logsumexp(x, dim=1), x.gather(1, targets[:, None]).squeeze(1)


def logit_grad_(
    z: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    coef_target: torch.Tensor,
    coef_prob: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Overwrites z with the logit gradient scale * (coef_prob * softmax(scale * z) + coef_target * onehot).

    With coef_target = dL/dlogp(target) and coef_prob = dL/dlse - dL/dlogp(target) this is
    dL/dz for a loss of the per-token target log-prob and log-normaliser."""
    check_targets(targets, z.shape[1])
    p = z if z.dtype == fp32(z).dtype else z.float()  # fp32 work buffer (z itself when fp32)
    if scale != 1.0:
        p.mul_(scale)
    p.sub_(lse[:, None]).exp_().mul_(coef_prob[:, None])
    p.scatter_add_(1, targets[:, None], coef_target[:, None].to(p.dtype))
    if scale != 1.0:
        p.mul_(scale)
    if p is not z:
        z.copy_(p)
    return z


def kl_grad_(
    zs: torch.Tensor,
    zt: torch.Tensor,
    coef: torch.Tensor,
    temperature: float,
    lam: torch.Tensor | None,
    reverse: bool,
    lse: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    coef_target: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row KL at temperature T between student logits zs [R, Vs] and teacher logits zt [R, V]
    on the shared ids 0..V-1 (V <= Vs).

    lam None: KL(p_T || p_S) (forward) or KL(p_S || p_T) (reverse). lam [R]: TIDAL,
    KL(r || p_S) with r = softmax(((1 - lam) zs + lam zt) / T) held constant. Returns the KL rows
    (fp32) and overwrites zs with coef * dKL/dzs (0 beyond the shared ids), plus, when coef_target
    [R] is given, the gradient of coef_target * log p(target) at temperature 1:
    coef_target * (onehot(targets) - exp(zs - lse)), over the whole row. Works on a few fp32
    [R, Vs] buffers."""
    if targets is not None:
        check_targets(targets, zs.shape[1])
    v = zt.shape[1]
    zs32, zt32 = fp32(zs[:, :v]), fp32(zt)
    log_s = F.log_softmax(zs32 / temperature, dim=-1)
    if lam is None:
        log_t = F.log_softmax(zt32 / temperature, dim=-1)
    else:
        lam = lam.to(zs32.dtype)[:, None]
        log_t = F.log_softmax(((1 - lam) * zs32 + lam * zt32) / temperature, dim=-1)
    del zt32
    if reverse:  # KL(p_s || p_t); d/dz_s: p_s (log p_s - log p_t - KL) / T
        p = log_s.exp()
        diff = log_t.neg_().add_(log_s)  # log p_s - log p_t
    else:  # KL(p_t || p_s); only log p_s carries gradient: (p_s * sum(p_t) - p_t) / T
        p = log_t.exp()
        diff = log_t.sub_(log_s)  # log p_t - log p_s
    terms = p * diff
    terms.masked_fill_(p == 0, 0.0)  # 0 log 0 = 0, as the reference
    kl = terms.sum(-1)
    if reverse:  # where p_s = 0 (a -inf logit) the limit 0, not 0 * inf = NaN
        grad = diff.sub_(kl[:, None]).mul_(p).masked_fill_(p == 0, 0.0)
    else:
        grad = log_s.exp_().mul_(p.sum(-1, keepdim=True)).sub_(p)
    grad.mul_((coef.to(grad.dtype) / temperature)[:, None])
    if coef_target is None:
        zs[:, v:].zero_()
        zs[:, :v].copy_(grad)
        return kl
    full = fp32(zs).sub(lse[:, None]).exp_().mul_(-coef_target[:, None].to(grad.dtype))  # a new buffer
    full.scatter_add_(1, targets[:, None], coef_target[:, None].to(full.dtype))
    full[:, :v] += grad
    zs.copy_(full)
    return kl
