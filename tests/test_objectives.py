import math

import pytest
import torch

from tide_ds.objectives import (
    bd3lm_ce,
    calm,
    chunk_logprobs,
    chunk_tidal,
    comp_demo_inputs,
    comp_demo_merge,
    comp_demo_split,
    kl,
    tidal_kl,
    tidal_lambda,
    token_logprobs,
)


def test_chunk_logprobs_against_loop():
    gen = torch.Generator().manual_seed(0)
    lp = -torch.rand(3, 9, generator=gen)
    ids = torch.tensor([[0, 0, 1, -1, 1, 2, 2, 2, -1], [-1] * 9, [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    out = chunk_logprobs(lp, ids, 9)
    want = torch.zeros(3, 9)
    for b in range(3):
        for i in range(9):
            if ids[b, i] >= 0:
                want[b, ids[b, i]] += lp[b, i]
    assert torch.allclose(out, want)


def test_reverse_calm_gradient_is_minus_logit_q():
    T = 2.0
    s = torch.tensor([[0.01, 0.3, 0.5, 0.9, 0.999]], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([[0.2, 0.5, 0.99, 1e-3, 0.7]], dtype=torch.float64)
    mask = torch.ones_like(q, dtype=torch.bool)
    loss = calm(T * torch.log(s), T * torch.log(q), mask, temperature=T, reverse=True) * s.shape[1]
    (g,) = torch.autograd.grad(loss, s)
    assert torch.allclose(g, -torch.log(q / (1 - q)), rtol=1e-6)


def test_reverse_calm_bounded_forward_calm_not():
    T = 2.0
    # student chunk log-probs near 0 (s -> 1), and very negative (s -> 0); teacher anywhere
    ls = torch.tensor([[-1e-6, -1e-4, -0.5, -50.0, -1e4]], requires_grad=True)
    lt = torch.tensor([[-30.0, -1e-7, -3.0, -0.01, -1e4]])
    mask = torch.ones_like(lt, dtype=torch.bool)
    (g_rev,) = torch.autograd.grad(calm(ls, lt, mask, temperature=T, reverse=True) * 5, ls)
    bound = math.log((1 - 1e-7) / 1e-7) / T  # |s * logit(q)| / T <= 16.12 / T
    assert torch.isfinite(g_rev).all() and g_rev.abs().max() <= bound + 1e-3
    (g_fwd,) = torch.autograd.grad(calm(ls, lt, mask, temperature=T, reverse=False) * 5, ls)
    assert g_fwd.abs().max() > 1e3  # (s - q) / (T (1 - s)) blows up as s -> 1
    # reference formula of the reverse gradient
    s = torch.exp(ls.detach() / T).clamp(1e-7, 1 - 1e-7)
    q = torch.exp(lt / T).clamp(1e-7, 1 - 1e-7)
    inside = (torch.exp(ls.detach() / T) > 1e-7) & (torch.exp(ls.detach() / T) < 1 - 1e-7)
    want = torch.where(inside, -s * torch.log(q / (1 - q)) / T, torch.zeros_like(s))
    assert torch.allclose(g_rev, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("axis", ["both", "training_only", "timestep_only"])
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_tidal_lambda_ends(axis, schedule):
    t = torch.tensor([0.0, 0.25, 1.0])
    lam0 = tidal_lambda(t, 0.0, lambda_init=0.1, lambda_max=0.9, schedule=schedule, axis=axis)
    lam1 = tidal_lambda(t, 1.0, lambda_init=0.1, lambda_max=0.9, schedule=schedule, axis=axis)
    want0 = {"both": 0.1 * (1 - t), "training_only": torch.full_like(t, 0.1), "timestep_only": 0.9 * (1 - t)}[axis]
    want1 = {"both": 0.9 * (1 - t), "training_only": torch.full_like(t, 0.9), "timestep_only": 0.9 * (1 - t)}[axis]
    assert torch.allclose(lam0, want0) and torch.allclose(lam1, want1)
    mid = tidal_lambda(t, 0.5, schedule=schedule, axis="training_only")
    assert torch.allclose(mid, torch.full_like(t, 0.5))  # both schedules pass through the middle


def test_tidal_reference_value():
    gen = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(2, 3, 7, generator=gen), torch.randn(2, 3, 7, generator=gen)
    masked = torch.tensor([[1, 0, 1], [1, 1, 1]], dtype=torch.bool)
    t, T, p = torch.tensor([0.3, 0.7]), 2.0, 0.4
    got = tidal_kl(zs, zt, masked, t, p, temperature=T)
    total, n = 0.0, 0
    g = (1 - math.cos(math.pi * p)) / 2
    for b in range(2):
        lam = (0.1 + 0.8 * g) * (1 - t[b])
        w = math.exp(-((t[b] - 0.5) ** 2) / (2 * 0.15**2))
        for i in range(3):
            if masked[b, i]:
                r = torch.softmax(((1 - lam) * zs[b, i] + lam * zt[b, i]) / T, -1)
                s = torch.softmax(zs[b, i] / T, -1)
                total += w * (r * (r.log() - s.log())).sum()
                n += 1
    assert torch.allclose(got, T**2 * total / n, rtol=1e-5)


def test_kl_reference_and_vocab_cut():
    gen = torch.Generator().manual_seed(4)
    zs, zt = torch.randn(1, 2, 6, generator=gen), torch.randn(1, 2, 8, generator=gen)  # teacher has 2 extra ids
    masked = torch.tensor([[True, False]])
    T = 2.0
    ps, pt = torch.softmax(zs[0, 0] / T, -1), torch.softmax(zt[0, 0, :6] / T, -1)
    fwd = T**2 * (pt * (pt.log() - ps.log())).sum()
    rev = T**2 * (ps * (ps.log() - pt.log())).sum()
    assert torch.allclose(kl(zs, zt, masked, temperature=T), fwd, rtol=1e-5)
    assert torch.allclose(kl(zs, zt, masked, temperature=T, reverse=True), rev, rtol=1e-5)


def test_ce_normalisations():
    lp = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-1.0, -1.0, -1.0, -1.0]])
    masked = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    maskable = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    t = torch.tensor([0.5, 0.25])
    # weighted nll: row0 masked {0: 1*2, 2: 3*2} = 8 ; row1 {3: 1*4} = 4
    assert torch.allclose(bd3lm_ce(lp, masked, maskable, t, "token"), torch.tensor(12 / 7))
    assert torch.allclose(bd3lm_ce(lp, masked, maskable, t, "sequence"), torch.tensor((8 / 3 + 4 / 4) / 2))
    assert torch.allclose(bd3lm_ce(lp, masked, maskable, t, "batch"), torch.tensor(12 / 8))


def test_compdemo_reveals_each_position_in_exactly_one_pass():
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randint(0, 50, (4, 64), generator=gen)
    masked = torch.rand(4, 64, generator=gen) < 0.6
    x_t = torch.where(masked, 99, x0)
    m_a, m_b = comp_demo_split(masked, 0.5, generator=gen)
    assert torch.equal(m_a | m_b, masked) and not (m_a & m_b).any()
    assert 0.3 < m_a.sum() / masked.sum() < 0.7
    pass1, pass2 = comp_demo_inputs(x_t, x0, m_a, m_b)
    masked1, masked2 = pass1 == 99, pass2 == 99
    assert torch.equal(masked1 ^ masked2, masked) and not (masked1 & masked2).any()
    assert torch.equal(masked1, m_b) and torch.equal(masked2, m_a)
    # each masked position takes its prediction from the pass in which it was masked
    pred1, pred2 = torch.randn(4, 64, 5, generator=gen), torch.randn(4, 64, 5, generator=gen)
    merged = comp_demo_merge(pred1, pred2, m_b)
    assert torch.equal(merged[masked1], pred1[masked1]) and torch.equal(merged[masked2], pred2[masked2])


def _all_terms(zs, zt, ls, lt, masked, t):
    """Every objective on one set of inputs (logits [b,l,V], chunk log-probs [b,C])."""
    cm = torch.ones_like(ls, dtype=torch.bool)
    lam = tidal_lambda(t, 0.5)
    lp = token_logprobs(zs, zt.argmax(-1))
    return {
        "ce": bd3lm_ce(lp, masked, masked, t),
        "kl": kl(zs, zt, masked),
        "reverse_kl": kl(zs, zt, masked, reverse=True),
        "tidal": tidal_kl(zs, zt, masked, t, 0.5),
        "tidal_uniform_linear": tidal_kl(zs, zt, masked, t, 0.3, schedule="linear", timestep_weight="uniform"),
        "calm": calm(ls, lt, cm, reverse=False),
        "reverse_calm": calm(ls, lt, cm),
        "chunk_tidal": chunk_tidal(ls, lt, cm, lam),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_objective_finite_with_huge_logits(dtype):
    gen = torch.Generator().manual_seed(6)
    zs = (torch.randn(2, 5, 11, generator=gen).sign() * 1e4).to(dtype).requires_grad_()
    zt = (torch.randn(2, 5, 11, generator=gen) * 1e4).to(dtype)
    ls = (-torch.rand(2, 4, generator=gen) * 1e4).to(dtype).requires_grad_()
    lt = (-torch.rand(2, 4, generator=gen) * 1e4).to(dtype)
    masked = torch.ones(2, 5, dtype=torch.bool)
    t = torch.tensor([0.01, 0.99])
    for name, value in _all_terms(zs, zt, ls, lt, masked, t).items():
        assert torch.isfinite(value), name
        grads = torch.autograd.grad(value, [zs, ls], allow_unused=True)
        assert all(g is None or torch.isfinite(g).all() for g in grads), name


def test_gradcheck_every_term_float64():
    gen = torch.Generator().manual_seed(7)
    zt = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    lt = -torch.rand(2, 3, generator=gen, dtype=torch.float64) * 3
    masked = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    t = torch.tensor([0.3, 0.6], dtype=torch.float64)
    # TIDAL's target is a stop-gradient of the student: finite differences would move it too, so
    # those two terms are checked against their closed-form gradient in the next test instead.
    names = [n for n in _all_terms(zt, zt, lt, lt, masked, t) if "tidal" not in n]
    for name in names:
        zs = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
        ls = (-torch.rand(2, 3, generator=gen, dtype=torch.float64) * 3).requires_grad_()
        assert torch.autograd.gradcheck(lambda a, b, name=name: _all_terms(a, zt, b, lt, masked, t)[name], (zs, ls)), (
            name
        )
    # chunk sums
    lp = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 0, 1, -1, 2, 2], [1, 1, 1, 0, -1, -1]])
    assert torch.autograd.gradcheck(lambda x: chunk_logprobs(x, ids, 3), (lp,))


def test_tidal_gradients_closed_form():
    """With the mixed target r held fixed: dL/dz_s = T * w(t) * (softmax(z_s / T) - r) / |M|;
    chunk TIDAL: dL/dlS = w(t) * (s - m) / (T (1 - s)) / |C|."""
    gen = torch.Generator().manual_seed(8)
    T, p = 2.0, 0.7
    zs = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    masked = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    t = torch.tensor([0.3, 0.6], dtype=torch.float64)
    (g,) = torch.autograd.grad(tidal_kl(zs, zt, masked, t, p, temperature=T), zs)
    lam = tidal_lambda(t, p)[:, None, None]
    w = torch.exp(-((t - 0.5) ** 2) / (2 * 0.15**2))[:, None, None]
    r = torch.softmax(((1 - lam) * zs.detach() + lam * zt) / T, -1)
    want = T * w * (torch.softmax(zs.detach() / T, -1) - r) * masked[..., None] / masked.sum()
    assert torch.allclose(g, want, rtol=1e-10)

    ls = (-torch.rand(2, 3, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    lt = -torch.rand(2, 3, generator=gen, dtype=torch.float64) * 3
    cm = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    lam = tidal_lambda(t, p)
    (g,) = torch.autograd.grad(chunk_tidal(ls, lt, cm, lam, weight=w[:, 0, 0], temperature=T), ls)
    s, q = torch.exp(ls.detach() / T), torch.exp(lt / T)
    m = (1 - lam[:, None]) * s + lam[:, None] * q
    want = w[:, 0] * (s - m) / (T * (1 - s)) * cm / cm.sum()
    assert torch.allclose(g, want, rtol=1e-10)
