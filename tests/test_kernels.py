"""Fused chunk-likelihood / shared-vocabulary ops (tide_ds.kernels) against the plain references
in tide_ds.objectives: values and gradients for hidden, weight and bias."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tide_ds.kernels import (
    FusedCALMLoss,
    FusedKLLoss,
    cuda_extension,
    fused_calm,
    fused_head_loss,
    fused_kl,
    fused_tidal,
    kl_rows,
    target_logprobs,
    twin,
)
from tide_ds.objectives import bd3lm_ce, calm, chunk_logprobs
from tide_ds.objectives.kl import kl_per_position

ROOT = Path(__file__).resolve().parents[1]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def assert_rel(actual, expected, tol, what=""):
    """max |actual - expected| <= tol * max |expected| (exactly equal when expected is all zero)."""
    assert actual is not None and actual.shape == expected.shape, what
    err = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    assert err <= tol * scale or err <= 1e-30, f"{what}: max error {err:.3g} vs scale {scale:.3g} (tol {tol})"


def compare(fn, inputs, dtype, tol=None):
    """fn(impl) -> scalar; checks the fused value and gradients of `inputs` against impl="reference"."""
    results = {}
    for impl in ("reference", "twin"):
        for x in inputs:
            x.grad = None
        loss = fn(impl)
        (1.5 * loss).backward()  # an upstream gradient other than 1
        results[impl] = [loss.detach()] + [x.grad for x in inputs]
    tol = tol or TOL[dtype]
    for i, (got, want) in enumerate(zip(results["twin"], results["reference"])):
        assert_rel(got, want, tol, ["value", *(f"grad {j}" for j in range(len(inputs)))][i])
    return results["reference"]


def projection(g, n_shape, h, v, dtype, bias=False):
    hidden = torch.randn(*n_shape, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * h**-0.5 * 3).to(dtype).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.5).to(dtype).requires_grad_() if bias else None
    return hidden, weight, b


def peaked_targets(g, hidden, weight):
    """Half the targets are the argmax token (log-probs near 0), the rest random."""
    best = (hidden.detach().float() @ weight.detach().float().T).argmax(-1)
    rand = torch.randint(0, weight.shape[0], best.shape, generator=g)
    return torch.where(torch.rand(best.shape, generator=g) < 0.5, best, rand)


def chunk_layout(g, b, l, max_len, contiguous=True, extra_chunks=2):
    """chunk_ids [b, l]: runs of 1..max_len tokens, gaps (-1), shuffled ids, some ids unused (empty
    chunks); contiguous=False scatters each chunk's tokens over the row."""
    rows, counts = [], []
    for _ in range(b):
        ids, c = [], 0
        while len(ids) < l:
            n = int(torch.randint(1, max_len + 1, (1,), generator=g))
            if torch.rand(1, generator=g) < 0.2:
                ids += [-1] * n
            else:
                ids += [c] * n
                c += 1
        row = torch.tensor(ids[:l])
        if not contiguous:
            row = row[torch.randperm(l, generator=g)]
        rows.append(row)
        counts.append(int(row.max()) + 1)
    num_chunks = max(counts) + extra_chunks
    perm = torch.randperm(num_chunks, generator=g)
    ids = torch.stack(rows)
    return torch.where(ids >= 0, perm[ids.clamp_min(0)], -1), num_chunks


def chunk_mask(g, b, num_chunks, mode):
    if mode == "all":
        return torch.ones(b, num_chunks, dtype=torch.bool)
    if mode == "none":
        return torch.zeros(b, num_chunks, dtype=torch.bool)
    return torch.rand(b, num_chunks, generator=g) < 0.6


# ---------------------------------------------------------------- target_logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias,temperature", [(False, 1.0), (True, 1.7)])
def test_target_logprobs_matches_reference(dtype, bias, temperature):
    g = torch.Generator().manual_seed(0)
    hidden, weight, b = projection(g, (3, 13), 16, 1009, dtype, bias)  # V = 1009: prime, not a block multiple
    targets = peaked_targets(g, hidden, weight)
    up_logp, up_lse = torch.randn(3, 13, generator=g), torch.randn(3, 13, generator=g)
    params = [hidden, weight] + ([b] if bias else [])

    def fn(impl):
        logp, lse = target_logprobs(hidden, weight, targets, bias=b, temperature=temperature, impl=impl, block_rows=5)
        assert logp.shape == lse.shape == targets.shape and logp.dtype == torch.float32
        return (logp * up_logp).sum() + (lse * up_lse).sum()

    compare(fn, params, dtype)


# ---------------------------------------------------------------- fused_calm


@st.composite
def calm_cases(draw):
    return dict(
        seed=draw(st.integers(0, 2**16)),
        b=draw(st.integers(1, 3)),
        l=draw(st.integers(1, 24)),
        h=draw(st.integers(4, 24)),
        v=draw(st.integers(2, 600)),
        max_len=draw(st.integers(1, 6)),
        contiguous=draw(st.booleans()),
        block_rows=draw(st.integers(1, 9)),
        mask=draw(st.sampled_from(["random", "random", "all", "none"])),
        reverse=draw(st.booleans()),
        bias=draw(st.booleans()),
    )


def run_calm_case(case, dtype=torch.float32):
    g = torch.Generator().manual_seed(case["seed"])
    b, l = case["b"], case["l"]
    hidden, weight, bias = projection(g, (b, l), case["h"], case["v"], dtype, case["bias"])
    targets = peaked_targets(g, hidden, weight)
    ids, num_chunks = chunk_layout(g, b, l, case["max_len"], case["contiguous"])
    mask = chunk_mask(g, b, num_chunks, case["mask"])
    teacher = -6 * torch.rand(b, num_chunks, generator=g)

    def fn(impl):
        return fused_calm(
            hidden,
            weight,
            targets,
            ids,
            teacher,
            mask,
            reverse=case["reverse"],
            bias=bias,
            impl=impl,
            block_rows=case["block_rows"],
        )

    return compare(fn, [hidden, weight] + ([bias] if bias is not None else []), dtype)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(calm_cases())
def test_fused_calm_matches_reference_on_random_shapes(case):
    run_calm_case(case)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reverse", [True, False])
def test_fused_calm_half_precision(dtype, reverse):
    case = dict(
        seed=3,
        b=2,
        l=23,
        h=16,
        v=517,
        max_len=4,
        contiguous=True,
        block_rows=4,
        mask="random",
        reverse=reverse,
        bias=True,
    )
    value, *grads = run_calm_case(case, dtype)
    assert value > 0 and all(gr.abs().max() > 0 for gr in grads)


@pytest.mark.parametrize("mask", ["all", "none"])
def test_fused_calm_all_and_nothing_masked(mask):
    case = dict(
        seed=5, b=2, l=20, h=8, v=301, max_len=5, contiguous=True, block_rows=3, mask=mask, reverse=True, bias=False
    )
    value, dh, dw = run_calm_case(case)
    if mask == "none":
        assert value == 0 and not dh.any() and not dw.any()
    else:
        assert dh.abs().max() > 0


def test_fused_calm_chunk_longer_than_several_blocks():
    """One chunk of 7 tokens over blocks of 2 rows, next to empty chunks and tokens outside chunks."""
    g = torch.Generator().manual_seed(7)
    hidden, weight, _ = projection(g, (1, 10), 8, 97, torch.float32)
    targets = peaked_targets(g, hidden, weight)
    ids = torch.tensor([[-1, 2, 2, 2, 2, 2, 2, 2, 0, -1]])
    mask = torch.tensor([[True, True, True, True]])  # chunks 1 and 3 are empty
    teacher = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    for reverse in (True, False):
        compare(
            lambda impl, reverse=reverse: fused_calm(
                hidden, weight, targets, ids, teacher, mask, reverse=reverse, temperature=4.0, impl=impl, block_rows=2
            ),
            [hidden, weight],
            torch.float32,
        )


def test_fused_chunk_loss_takes_chunk_tidal():
    from tide_ds.kernels import fused_chunk_loss
    from tide_ds.objectives import chunk_tidal

    g = torch.Generator().manual_seed(13)
    hidden, weight, _ = projection(g, (3, 10), 8, 90, torch.float32)
    targets = peaked_targets(g, hidden, weight)
    ids, num_chunks = chunk_layout(g, 3, 10, 3)
    mask, teacher = chunk_mask(g, 3, num_chunks, "random"), -4 * torch.rand(3, num_chunks, generator=g)
    lam, w = torch.rand(3, generator=g), torch.rand(3, generator=g)
    loss = lambda lS: chunk_tidal(lS, teacher, mask, lam, weight=w)  # noqa: E731
    compare(
        lambda impl: fused_chunk_loss(hidden, weight, targets, ids, mask, loss, impl=impl, block_rows=4),
        [hidden, weight],
        torch.float32,
    )


def test_fused_calm_takes_flattened_hidden():
    g = torch.Generator().manual_seed(11)
    hidden, weight, _ = projection(g, (2, 9), 8, 50, torch.float32)
    targets = peaked_targets(g, hidden, weight)
    ids, num_chunks = chunk_layout(g, 2, 9, 3)
    mask, teacher = chunk_mask(g, 2, num_chunks, "random"), -4 * torch.rand(2, num_chunks, generator=g)
    flat = fused_calm(hidden.reshape(18, 8), weight, targets.reshape(18), ids.reshape(18), teacher, mask, block_rows=4)
    assert_rel(flat, fused_calm(hidden, weight, targets, ids, teacher, mask, impl="reference"), 1e-5)


def test_fused_calm_gradients_only_where_asked():
    g = torch.Generator().manual_seed(2)
    hidden, weight, _ = projection(g, (1, 12), 8, 40, torch.float32)
    weight.requires_grad_(False)
    targets = peaked_targets(g, hidden, weight)
    ids, num_chunks = chunk_layout(g, 1, 12, 3)
    teacher, mask = -3 * torch.rand(1, num_chunks, generator=g), torch.ones(1, num_chunks, dtype=torch.bool)
    loss = fused_calm(hidden, weight, targets, ids, teacher, mask, block_rows=5)
    loss.backward()
    assert hidden.grad is not None and weight.grad is None
    with torch.no_grad():
        assert not fused_calm(hidden, weight, targets, ids, teacher, mask).requires_grad
    loss = fused_calm(hidden, weight, targets, ids, teacher, mask)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()


# ---------------------------------------------------------------- shared-vocabulary terms


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("mask", ["random", "all", "none"])
@pytest.mark.parametrize("vocab", [(523, 611), (611, 523)])
def test_fused_kl_matches_reference(dtype, reverse, mask, vocab):
    g = torch.Generator().manual_seed(1)
    hs, ws, bs = projection(g, (3, 11), 16, vocab[0], dtype, bias=True)  # different vocab sizes, shared ids
    ht, wt, bt = projection(g, (3, 11), 24, vocab[1], dtype, bias=True)
    masked = chunk_mask(g, 3, 11, mask)
    value, dh, dw, db = compare(
        lambda impl: fused_kl(
            hs, ws, ht, wt, masked, reverse=reverse, student_bias=bs, teacher_bias=bt, impl=impl, block_rows=4
        ),
        [hs, ws, bs],
        dtype,
    )
    assert ht.grad is None and wt.grad is None and bt.grad is None
    assert not dw[min(vocab) :].any() and not db[min(vocab) :].any()  # ids outside the shared range
    assert (value > 0 and dh.abs().max() > 0) if mask != "none" else (value == 0 and not dh.any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [False, True])
def test_fused_tidal_matches_reference(dtype, rows):
    g = torch.Generator().manual_seed(4)
    lead = (17,) if rows else (3, 7)  # masked rows [n, H] with t [n], or sequences [b, l, H] with t [b]
    hs, ws, _ = projection(g, lead, 12, 701, dtype)
    ht, wt, _ = projection(g, lead, 20, 650, dtype)
    masked = None if rows else chunk_mask(g, 3, 7, "random")
    t = torch.rand(lead[0], generator=g)
    compare(lambda impl: fused_tidal(hs, ws, ht, wt, masked, t, 0.4, impl=impl, block_rows=3), [hs, ws], dtype)


# ---------------------------------------------------------------- one pass: log-prob terms + a KL term


def head_case(g, dtype, vocab, kind, mask_mode="random", bias=True):
    """A CE + CALM loss of the target log-probs of b x l rows (chunks of 1-3 tokens, some rows in no
    chunk) and a KL term of `kind` against teacher rows; returns (fn(impl) -> the three outputs,
    the student tensors)."""
    b, l = 3, 10
    hs, ws, bs = projection(g, (b * l,), 16, vocab[0], dtype, bias=bias)
    ht, wt, bt = projection(g, (b * l,), 24, vocab[1], dtype, bias=True)
    targets = peaked_targets(g, hs, ws)
    ids, num_chunks = chunk_layout(g, b, l, 3)
    active = chunk_mask(g, b, num_chunks, mask_mode)
    teacher_lp = -4 * torch.rand(b, num_chunks, generator=g)
    masked, t = chunk_mask(g, b, l, "random"), torch.rand(b * l, generator=g)
    groups = torch.where(ids >= 0, ids + torch.arange(b)[:, None] * num_chunks, -1).reshape(-1)
    w_ce = (torch.rand(b * l, generator=g) < 0.7).float()

    def logprob_loss(lp):
        token_lp = lp.view(b, l)
        ce = bd3lm_ce(token_lp, w_ce.view(b, l).bool(), torch.ones(b, l, dtype=torch.bool), t.view(b, l)[:, 0])
        return ce + 0.5 * calm(chunk_logprobs(token_lp, ids, num_chunks), teacher_lp, active)

    kl = (
        None
        if kind is None
        else kl_rows(
            ht,
            wt,
            masked.reshape(-1),
            temperature=1.5,
            reverse=kind == "reverse",
            teacher_bias=bt,
            lam=0.8 * t if kind == "tidal" else None,
            row_weight=t + 0.5 if kind == "tidal" else None,
        )
    )

    def fn(impl):
        return fused_head_loss(
            hs,
            ws,
            targets,
            logprob_loss,
            groups=groups,
            num_groups=b * num_chunks,
            kl=kl,
            bias=bs,
            impl=impl,
            block_rows=4,
        )

    return fn, [hs, ws, bs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", [None, "forward", "reverse", "tidal"])
@pytest.mark.parametrize("vocab", [(523, 611), (611, 523)])
def test_fused_head_loss_matches_reference(dtype, kind, vocab):
    """CE + CALM on the log-probs and a KL term in one pass: value, log-probs, KL rows, gradients."""
    g = torch.Generator().manual_seed(5)
    fn, params = head_case(g, dtype, vocab, kind)
    outputs = {}
    for impl in ("reference", "twin"):
        for p in params:
            p.grad = None
        loss, logp, kl_vals = fn(impl)
        (1.5 * loss).backward()
        outputs[impl] = [loss.detach(), logp, kl_vals] + [p.grad for p in params]
    for i, (got, want) in enumerate(zip(outputs["twin"], outputs["reference"])):
        if want is None:
            assert got is None
        else:
            assert_rel(got, want, TOL[dtype], ["value", "logp", "kl rows", "dh", "dW", "db"][i])
    assert outputs["twin"][4].abs().max() > 0


@pytest.mark.parametrize("mask_mode", ["all", "none"])
def test_fused_head_loss_all_and_nothing_active(mask_mode):
    g = torch.Generator().manual_seed(6)
    fn, params = head_case(g, torch.float32, (300, 300), "forward", mask_mode=mask_mode, bias=False)
    compare(lambda impl: fn(impl)[0], params[:2], torch.float32)


def test_fused_head_loss_with_no_rows():
    hidden, weight, _ = projection(torch.Generator().manual_seed(0), (0,), 8, 50, torch.float32)
    loss, logp, kl_vals = fused_head_loss(
        hidden,
        weight,
        torch.zeros(0, dtype=torch.long),
        lambda lp: lp.sum(),
        kl=kl_rows(torch.zeros(0, 8), weight.detach()),
    )
    loss.backward()
    assert loss.item() == 0 and logp.shape == (0,) and kl_vals.shape == (0,)
    assert not weight.grad.any()


# ---------------------------------------------------------------- edge cases of the row kernels
# The twin is checked against torch (the references) here, on CPU; the GPU tests below check the
# CUDA kernels against the twin on the same blocks.

INF = float("inf")


def edge_blocks(dtype=torch.float32):
    """{name: (z [R, V], targets [R])}: +inf and -inf logits, and odd shapes (one column, just
    under and over a 512-wide tile, one row, no rows)."""
    g = torch.Generator().manual_seed(17)
    z = torch.randn(4, 600, generator=g) * 3
    z[0, 5] = INF  # +inf beside the target
    z[1, 7] = INF  # +inf at the target
    z[2, [3, 550]] = INF  # two +inf, in different tiles
    plus = (z, torch.tensor([1, 7, 3, 9]))
    z = torch.randn(4, 600, generator=g) * 3
    z[:, 100:140] = -INF  # masked-out ids, as a padded vocabulary has
    z[1, :] = -INF
    z[1, 599] = 0.0  # all -inf but one
    minus = (z, torch.tensor([0, 599, 520, 99]))
    blocks = {"plus_inf": plus, "minus_inf": minus}
    for rows, vocab in ((3, 1), (5, 511), (5, 513), (1, 1537), (0, 50)):
        blocks[f"{rows}x{vocab}"] = (
            torch.randn(rows, vocab, generator=g) * 4,
            torch.randint(0, vocab, (rows,), generator=g),
        )
    return {k: (z.to(dtype), y) for k, (z, y) in blocks.items()}


def test_twin_lse_target_edge_cases_match_torch():
    for name, (z, y) in edge_blocks().items():
        lse, tgt = twin.lse_target(z, y, 0.7)
        torch.testing.assert_close(lse, torch.logsumexp(z * 0.7, 1), equal_nan=True, msg=name)
        torch.testing.assert_close(tgt, (z * 0.7).gather(1, y[:, None]).squeeze(1), equal_nan=True, msg=name)
    lse, _ = twin.lse_target(*edge_blocks()["plus_inf"], 1.0)
    assert lse[:3].isposinf().all()  # rows with a +inf: +inf, not NaN
    lse, tgt = twin.lse_target(*edge_blocks()["minus_inf"], 1.0)
    assert lse.isfinite().all() and tgt.isfinite().all()


def test_twin_logit_grad_edge_cases_match_torch():
    g = torch.Generator().manual_seed(3)
    for name, (z, y) in edge_blocks().items():
        zr = z.clone().requires_grad_()
        lse = torch.logsumexp(zr * 0.7, 1)
        logp = (zr * 0.7).gather(1, y[:, None]).squeeze(1) - lse
        up_lp, up_lse = torch.randn(z.shape[0], generator=g), torch.randn(z.shape[0], generator=g)
        ((logp * up_lp).sum() + (lse * up_lse).sum()).backward()
        got = twin.logit_grad_(z.clone(), y, lse.detach(), up_lp, up_lse - up_lp, 0.7)
        if name == "plus_inf":  # a +inf logit has no gradient (NaN in the reference too); the lse is +inf above
            continue
        torch.testing.assert_close(got, zr.grad, msg=name)


@pytest.mark.parametrize("kind", ["forward", "reverse", "tidal"])
def test_twin_kl_grad_with_minus_inf_logits(kind):
    """Ids that are -inf on both sides (a padded vocabulary) add nothing: the KL and gradient equal
    the reference's on the other ids, the gradient there is 0, and nothing is NaN (the reference's
    autograd gives NaN for the reverse KL)."""
    g = torch.Generator().manual_seed(8)
    zs, zt = torch.randn(5, 700, generator=g) * 3, torch.randn(5, 650, generator=g) * 3
    dead = torch.zeros(650, dtype=torch.bool)
    dead[[0, 37, 300, 511, 512, 649]] = True
    zs[:, :650][:, dead], zt[:, dead] = -INF, -INF
    keep = (~dead).nonzero().squeeze(1)
    coef, lam = torch.rand(5, generator=g), torch.rand(5, generator=g) if kind == "tidal" else None
    lse = torch.logsumexp(zs, 1)
    y = torch.tensor([1, 2, 650, 699, 5])
    coef_t = torch.randn(5, generator=g)
    got = zs.clone()
    kl = twin.kl_grad_(got, zt, coef, 2.0, lam, kind == "reverse", lse, y, coef_t)
    a = zs[:, keep].clone().requires_grad_()
    want = kl_per_position(a, zt[:, keep], temperature=2.0, reverse=kind == "reverse", lam=lam)
    (coef * want).sum().backward()
    torch.testing.assert_close(kl, want.detach())
    logp_grad = coef_t[:, None] * (torch.nn.functional.one_hot(y, 700) - (zs - lse[:, None]).exp())
    torch.testing.assert_close(got[:, keep], a.grad + logp_grad[:, keep])
    torch.testing.assert_close(got[:, :650][:, dead], torch.zeros(5, int(dead.sum())))
    assert got.isfinite().all()


@pytest.mark.parametrize("name", ["3x1", "5x511", "5x513", "1x1537", "0x50"])
def test_twin_kl_grad_odd_shapes_match_torch(name):
    zs, _ = edge_blocks()[name]
    g = torch.Generator().manual_seed(4)
    zt = torch.randn(zs.shape[0], zs.shape[1], generator=g) * 2
    coef = torch.rand(zs.shape[0], generator=g)
    for reverse in (False, True):
        got = zs.clone()
        kl = twin.kl_grad_(got, zt, coef, 1.5, None, reverse)
        a = zs.clone().requires_grad_()
        want = kl_per_position(a, zt, temperature=1.5, reverse=reverse)
        (coef * want).sum().backward()
        torch.testing.assert_close(kl, want.detach())
        torch.testing.assert_close(got, a.grad)


def test_out_of_range_targets_are_refused():
    """Targets outside [0, V) stop the twin with one line (the CUDA binding checks the same), never
    read another logit; through every fused op, not only the row kernels."""
    z, y = torch.randn(3, 40), torch.tensor([0, 40, 2])
    message = r"targets must lie in \[0, 40\), got values in \[0, 40\]"
    with pytest.raises(ValueError, match=message):
        twin.lse_target(z, y, 1.0)
    with pytest.raises(ValueError, match=message):
        twin.logit_grad_(z, y, torch.zeros(3), torch.ones(3), torch.ones(3), 1.0)
    with pytest.raises(ValueError, match=message):
        twin.kl_grad_(z, z[:, :30].clone(), torch.ones(3), 1.0, None, False, torch.zeros(3), y, torch.ones(3))
    g = torch.Generator().manual_seed(0)
    hidden, weight, _ = projection(g, (2, 6), 8, 40, torch.float32)
    for bad in (-1, 40):
        targets = torch.zeros(2, 6, dtype=torch.long)
        targets[1, 3] = bad
        ids = torch.arange(12).view(2, 6) // 2
        with pytest.raises(ValueError, match="targets must lie in"):
            target_logprobs(hidden, weight, targets, impl="twin", block_rows=5)
        with pytest.raises(ValueError, match="targets must lie in"):
            fused_calm(hidden, weight, targets, ids, -torch.rand(2, 6), torch.ones(2, 6, dtype=torch.bool), impl="twin")
        kl = kl_rows(torch.randn(12, 8), weight.detach())
        with pytest.raises(ValueError, match="targets must lie in"):
            fused_head_loss(hidden.view(12, 8), weight, targets.view(12), lambda lp: lp.sum(), kl=kl, impl="twin")


# ---------------------------------------------------------------- modules, dispatch, memory


def test_modules_match_functional():
    g = torch.Generator().manual_seed(9)
    hidden, weight, _ = projection(g, (2, 8), 8, 64, torch.float32)
    targets = peaked_targets(g, hidden, weight)
    ids, num_chunks = chunk_layout(g, 2, 8, 3)
    mask, teacher = chunk_mask(g, 2, num_chunks, "all"), -3 * torch.rand(2, num_chunks, generator=g)
    module = FusedCALMLoss(temperature=3.0, reverse=False)
    assert_rel(
        module(hidden, weight, targets, ids, teacher, mask),
        fused_calm(hidden, weight, targets, ids, teacher, mask, temperature=3.0, reverse=False),
        0,
    )
    ht, wt, _ = projection(g, (2, 8), 8, 70, torch.float32)
    assert_rel(FusedKLLoss(reverse=True)(hidden, weight, ht, wt), fused_kl(hidden, weight, ht, wt, reverse=True), 0)


class BindingChecks:
    """The twin behind the argument checks of kernels/binding.cpp (minus the device check), so the
    tiled ops are seen to call the CUDA binding the way it accepts."""

    @staticmethod
    def _block(z):
        assert z.dim() == 2 and z.is_contiguous() and z.dtype in (torch.float32, torch.float16, torch.bfloat16)

    @staticmethod
    def _rows(z, *vectors):
        assert all(v.numel() == z.shape[0] for v in vectors)

    def lse_target(self, z, targets, scale):
        self._block(z), self._rows(z, targets)
        return twin.lse_target(z, targets, scale)

    def logit_grad_(self, z, targets, lse, coef_target, coef_prob, scale):
        self._block(z), self._rows(z, targets, lse, coef_target, coef_prob)
        return twin.logit_grad_(z, targets, lse, coef_target, coef_prob, scale)

    def kl_grad_(self, zs, zt, coef, temperature, lam, reverse, lse=None, targets=None, coef_target=None):
        extra = [x for x in (lam, lse, targets, coef_target) if x is not None]
        self._block(zs), self._block(zt), self._rows(zs, coef, *extra)
        assert zs.shape[0] == zt.shape[0] and zt.shape[1] <= zs.shape[1] and not (reverse and lam is not None)
        assert (lse is None) == (targets is None) == (coef_target is None)
        return twin.kl_grad_(zs, zt, coef, temperature, lam, reverse, lse, targets, coef_target)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_call_the_row_kernels_as_the_cuda_binding_accepts(monkeypatch, dtype):
    from tide_ds.kernels import functional

    monkeypatch.setattr(functional, "_kernels", lambda t, impl: BindingChecks())
    g = torch.Generator().manual_seed(21)
    hidden, weight, bias = projection(g, (2, 15), 8, 211, dtype, bias=True)
    targets = peaked_targets(g, hidden, weight)
    ids, num_chunks = chunk_layout(g, 2, 15, 4)
    mask, teacher = chunk_mask(g, 2, num_chunks, "random"), -4 * torch.rand(2, num_chunks, generator=g)
    ht, wt, _ = projection(g, (2, 15), 12, 200, dtype)
    masked, t = chunk_mask(g, 2, 15, "random"), torch.rand(2, generator=g)
    params = [hidden, weight, bias]
    compare(
        lambda impl: fused_calm(hidden, weight, targets, ids, teacher, mask, bias=bias, impl=impl, block_rows=4),
        params,
        dtype,
    )
    compare(
        lambda impl: target_logprobs(hidden, weight, targets, bias=bias, temperature=2.0, impl=impl, block_rows=4)[
            0
        ].sum(),
        params,
        dtype,
    )
    for reverse in (False, True):
        compare(
            lambda impl, reverse=reverse: fused_kl(
                hidden, weight, ht, wt, masked, reverse=reverse, student_bias=bias, impl=impl, block_rows=4
            ),
            params,
            dtype,
        )
    compare(
        lambda impl: fused_tidal(hidden, weight, ht, wt, masked, t, 0.7, student_bias=bias, impl=impl, block_rows=4),
        params,
        dtype,
    )
    for kind in ("forward", "reverse", "tidal"):
        fn, params = head_case(g, dtype, (211, 200), kind)
        compare(lambda impl, fn=fn: fn(impl)[0], params, dtype)


def test_unknown_impl_is_refused():
    hidden, weight, _ = projection(torch.Generator().manual_seed(0), (4,), 4, 8, torch.float32)
    with pytest.raises(ValueError, match="impl"):
        target_logprobs(hidden, weight, torch.zeros(4, dtype=torch.long), impl="fast")


def _status_kib(key: str) -> int:
    return next(int(x.split()[1]) for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))


def _resident_peak(fn) -> int:
    """Growth of the resident set's high-water mark during fn(), in bytes."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    base = _status_kib("VmRSS:")
    fn()
    return (_status_kib("VmHWM:") - base) * 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_fused_calm_never_builds_full_logits():
    g = torch.Generator().manual_seed(0)
    n, v = 512, 50_000
    hidden, weight, _ = projection(g, (1, n), 32, v, torch.float32)
    targets = torch.randint(0, v, (1, n), generator=g)
    ids = (torch.arange(n) // 3)[None]
    teacher, mask = -3 * torch.rand(1, n // 3 + 1, generator=g), torch.ones(1, n // 3 + 1, dtype=torch.bool)

    def step(impl):
        hidden.grad = weight.grad = None
        fused_calm(hidden, weight, targets, ids, teacher, mask, impl=impl, block_rows=32).backward()

    step("twin"), step("reference")  # warm-up
    fused, ref = _resident_peak(lambda: step("twin")), _resident_peak(lambda: step("reference"))
    assert ref > n * v * 4  # the reference holds [N, V] fp32 logits at least once
    assert fused < 0.15 * ref, (fused, ref)


def test_bench_kernel_prints_figures(capsys):
    from tide_ds.cli import main

    assert main(["bench", "kernel", "--device", "cpu", "--n", "64", "--h", "8", "--v", "300", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for text in ("matmul", "reference", "fused", "fused / reference: time", "peak memory", "acceptance (cpu"):
        assert text in out


# ---------------------------------------------------------------- build

CSRC = ROOT / "kernels"


def _nvcc() -> str | None:
    """nvcc: $TIDE_DS_NVCC (set by .ci/run to the one it installs from the package registry), else PATH."""
    path = os.environ.get("TIDE_DS_NVCC")
    if path:
        assert Path(path).is_file(), f"TIDE_DS_NVCC={path} is not a file"
        return path
    return shutil.which("nvcc")


def _cuda_include() -> Path | None:
    nvcc = _nvcc()
    roots = [Path(nvcc).resolve().parents[1]] if nvcc else []
    roots += [Path(r) for r in (os.environ.get("CUDA_HOME"), "/usr/local/cuda") if r]
    return next((r / "include" for r in roots if (r / "include" / "cuda_runtime.h").exists()), None)


def _torch_cuda_include() -> list[Path] | None:
    """Include dirs of a CUDA build of torch: $TIDE_DS_CUDA_TORCH_INCLUDE (.ci/run extracts them from
    the registry's torch wheel), or this torch's when it is a CUDA build."""
    root = os.environ.get("TIDE_DS_CUDA_TORCH_INCLUDE")
    if root:
        assert (Path(root) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists(), f"{root}: no CUDA torch headers"
        return [Path(root), Path(root) / "torch" / "csrc" / "api" / "include"]
    if torch.version.cuda is not None:
        from torch.utils.cpp_extension import include_paths

        return [Path(p) for p in include_paths()]
    return None


# CI (.ci/run) installs the toolchain and sets this: there the compile tests must run, not skip.
CUDA_COMPILE_REQUIRED = os.environ.get("TIDE_DS_REQUIRE_CUDA_COMPILE") == "1"


@pytest.mark.skipif(
    not CUDA_COMPILE_REQUIRED
    and (shutil.which("g++") is None or _cuda_include() is None or _torch_cuda_include() is None),
    reason="needs g++, the CUDA headers and a CUDA torch's headers (TIDE_DS_NVCC, TIDE_DS_CUDA_TORCH_INCLUDE)",
)
def test_cuda_binding_compiles():
    """The PyTorch binding compiles against a CUDA torch's headers (syntax and types; nothing links)."""
    import sysconfig

    assert shutil.which("g++") and _cuda_include() and _torch_cuda_include(), "set TIDE_DS_CUDA_TORCH_INCLUDE"
    cmd = [
        "g++",
        "-std=c++20",  # what torch.utils.cpp_extension compiles with
        "-fsyntax-only",
        "-Wall",
        "-Werror",
        *(f"-I{p}" for p in _torch_cuda_include()),
        f"-I{_cuda_include()}",
        f"-I{sysconfig.get_paths()['include']}",
        "-DTORCH_EXTENSION_NAME=tide_ds_kernels",
        str(CSRC / "binding.cpp"),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]


@pytest.mark.skipif(not CUDA_COMPILE_REQUIRED and _nvcc() is None, reason="needs nvcc (TIDE_DS_NVCC or PATH)")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_source_compiles(tmp_path, arch):
    """The CUDA source (no torch headers) compiles for Ampere and Hopper with every warning an
    error, and ptxas spills no register."""
    assert _nvcc(), "no nvcc: set TIDE_DS_NVCC (.ci/cuda_toolchain.sh installs one)"
    cmd = [_nvcc(), "-c", f"-arch={arch}", "-O3", "-Werror", "all-warnings", "-Xptxas", "-v"]
    cmd += [str(CSRC / "tide_kernels.cu"), "-o", str(tmp_path / "tide_kernels.o")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    report = [line for line in out.stderr.splitlines() if "spill" in line]
    assert report and all(" 0 bytes spill stores, 0 bytes spill loads" in line for line in report), out.stderr


# The running log-sum-exp of the CUDA kernels (csrc/tide_lse.h), compiled as host C++: each input
# line is one row; prints the sequential add() and a tree of merge()s over chunks of 3 (as the
# warps' partial sums are merged).
LSE_DRIVER = r"""
#include <cstdio>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>
#include "tide_lse.h"
int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::vector<float> xs;
    std::string w;
    while (in >> w) xs.push_back(std::stof(w));
    Lse seq{-INFINITY, 0.f};
    for (float x : xs) seq.add(x);
    std::vector<Lse> parts;
    for (size_t i = 0; i < xs.size() || parts.empty(); i += 3) {
      Lse p{-INFINITY, 0.f};
      for (size_t j = i; j < i + 3 && j < xs.size(); ++j) p.add(xs[j]);
      parts.push_back(p);
    }
    while (parts.size() > 1) {
      std::vector<Lse> next;
      for (size_t i = 0; i < parts.size(); i += 2)
        next.push_back(i + 1 < parts.size() ? Lse::merge(parts[i], parts[i + 1]) : parts[i]);
      parts = next;
    }
    std::printf("%.9g %.9g\n", seq.value(), parts[0].value());
  }
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_lse_merge_on_host_matches_torch(tmp_path):
    """The kernels' online log-sum-exp (add and merge) equals torch.logsumexp on +inf, -inf, NaN,
    empty and ordinary rows: a +inf logit gives +inf, never NaN."""
    (tmp_path / "driver.cpp").write_text(LSE_DRIVER)
    exe = tmp_path / "driver"
    build = subprocess.run(
        ["g++", "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{CSRC}", str(tmp_path / "driver.cpp"), "-o", str(exe)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stderr
    inf, nan = float("inf"), float("nan")
    g = torch.Generator().manual_seed(0)
    rows = [
        [inf, 1.0],
        [1.0, 2.0, inf],
        [inf, inf, inf, 3.0],
        [2.0, inf, -inf, inf, 0.5, -1.0, inf],
        [-inf, -inf, -inf, -inf],
        [-inf, 0.0, -inf, -inf, -inf],
        [nan, 1.0, 2.0, 3.0],
        [1.0, 2.0, 3.0, nan],
        [-inf, -inf, -inf, nan],
        [80.0, 80.0, 80.0, 80.0, 80.0],
        [1e30, -1e30, 0.0],
        (torch.randn(37, generator=g) * 20).tolist(),
        [],
    ]
    text = "\n".join(" ".join(repr(float(x)) for x in r) for r in rows) + "\n"
    out = subprocess.run([str(exe)], input=text, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = torch.tensor([[float(v) for v in line.split()] for line in out.stdout.splitlines()])
    want = torch.stack([torch.logsumexp(torch.tensor(r, dtype=torch.float32), 0) for r in rows])
    for col, how in ((0, "add"), (1, "merge")):
        torch.testing.assert_close(got[:, col], want, rtol=1e-6, atol=1e-6, equal_nan=True, msg=how)


def test_setup_builds_no_cuda_extension_without_cuda():
    if torch.version.cuda is not None:
        pytest.skip("a CUDA torch: setup.py would build the extension")
    out = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "tide_ds", out.stderr
    assert "not building the CUDA extension" in out.stderr


# ---------------------------------------------------------------- GPU (the references run on CPU)


def _cuda_kernels():
    """The CUDA extension; on a GPU machine a failed build fails the test (it must not pass on the twin)."""
    if os.environ.get("TIDE_DS_NO_CUDA_EXT"):
        pytest.skip("TIDE_DS_NO_CUDA_EXT is set")
    ext = cuda_extension()
    assert ext is not None, "the CUDA extension did not build (see the warning above)"
    return ext


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_row_kernels_edge_cases_match_twin(dtype):
    """+inf / -inf logits and odd shapes (edge_blocks): the CUDA kernels give what the twin gives,
    NaN for NaN (a +inf logit: +inf log-sum-exp, never NaN)."""
    ext = _cuda_kernels()
    g = torch.Generator().manual_seed(1)
    close = functools.partial(torch.testing.assert_close, equal_nan=True, rtol=TOL[dtype], atol=1e-5)
    for name, (z, y) in edge_blocks(dtype).items():
        rows = z.shape[0]
        lse, tgt = ext.lse_target(z.cuda(), y.cuda(), 0.7)
        want_lse, want_tgt = twin.lse_target(z, y, 0.7)
        close(lse.cpu(), want_lse, msg=f"{name} lse")
        close(tgt.cpu(), want_tgt, msg=f"{name} target")
        coef_t, coef_p = torch.randn(rows, generator=g), torch.randn(rows, generator=g)
        got = ext.logit_grad_(z.cuda(), y.cuda(), want_lse.cuda(), coef_t.cuda(), coef_p.cuda(), 0.7)
        close(got.cpu().float(), twin.logit_grad_(z.clone(), y, want_lse, coef_t, coef_p, 0.7).float(), msg=name)
        if name == "plus_inf":  # a +inf student logit: NaN KL rows both ways; the lse above is what matters
            continue
        zt = z.clone() if name == "minus_inf" else (torch.randn(z.shape, generator=g) * 2).to(dtype)
        coef, lam = torch.rand(rows, generator=g), torch.rand(rows, generator=g)
        lse1 = twin.lse_target(z, y, 1.0)[0]
        for mix, reverse in ((None, False), (None, True), (lam, False)):
            zs_gpu, zs_cpu = z.cuda(), z.clone()
            extra = (lse1, y, coef_t)
            mix_gpu = None if mix is None else mix.cuda()
            kl = ext.kl_grad_(zs_gpu, zt.cuda(), coef.cuda(), 2.0, mix_gpu, reverse, *(x.cuda() for x in extra))
            want = twin.kl_grad_(zs_cpu, zt, coef, 2.0, mix, reverse, *extra)
            what = f"{name} kl reverse={reverse} tidal={mix is not None}"
            close(kl.cpu(), want, msg=what)
            close(zs_gpu.cpu().float(), zs_cpu.float(), msg=what + " grad")


@pytest.mark.gpu
@needs_cuda
def test_cuda_row_kernels_refuse_out_of_range_targets():
    ext = _cuda_kernels()
    z = torch.randn(3, 40, device="cuda")
    message = r"targets must lie in \[0, 40\), got values in \[-1, 2\]"
    y = torch.tensor([0, -1, 2], device="cuda")
    with pytest.raises(ValueError, match=message):
        ext.lse_target(z, y, 1.0)
    ones = torch.ones(3, device="cuda")
    with pytest.raises(ValueError, match=message):
        ext.logit_grad_(z, y, ones, ones, ones, 1.0)
    with pytest.raises(ValueError, match=message):
        ext.kl_grad_(z, z[:, :30].contiguous(), ones, 1.0, None, False, ones, y, ones)
    g = torch.Generator().manual_seed(0)
    hidden, weight, _ = (x.detach().cuda().requires_grad_() for x in projection(g, (6,), 8, 40, torch.float32))
    with pytest.raises(ValueError, match="targets must lie in"):
        target_logprobs(hidden, weight, torch.tensor([0, 1, 2, 40, 3, 4], device="cuda"))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_row_kernels_match_twin(dtype):
    ext = _cuda_kernels()
    g = torch.Generator().manual_seed(0)
    rows, vocab = 13, 151_937
    z = (torch.randn(rows, vocab, generator=g) * 4).to(dtype)
    y = torch.randint(0, vocab, (rows,), generator=g)
    coef_t, coef_p = torch.randn(rows, generator=g), torch.randn(rows, generator=g)
    tol = TOL[dtype] if dtype != torch.float32 else 1e-5
    lse, tgt = ext.lse_target(z.cuda(), y.cuda(), 0.7)
    want_lse, want_tgt = twin.lse_target(z, y, 0.7)
    assert_rel(lse.cpu(), want_lse, 1e-6, "lse")
    assert_rel(tgt.cpu(), want_tgt, 1e-6, "target")
    got = ext.logit_grad_(z.cuda(), y.cuda(), want_lse.cuda(), coef_t.cuda(), coef_p.cuda(), 0.7)
    assert_rel(got.cpu().float(), twin.logit_grad_(z.clone(), y, want_lse, coef_t, coef_p, 0.7).float(), tol, "grad")
    zt = (torch.randn(rows, vocab, generator=g) * 4).to(dtype)
    coef, lam = torch.rand(rows, generator=g), torch.rand(rows, generator=g)
    for mix, reverse in ((None, False), (None, True), (lam, False)):
        # the teacher row as wide as the student's, or narrower (shared ids), with and without a log-prob term
        for width, logp_term in ((vocab, False), (vocab - 1000, True)):
            what = f"kl reverse={reverse} tidal={mix is not None} width={width} logp={logp_term}"
            extra = (want_lse, y, coef_t) if logp_term else (None, None, None)
            zs_gpu = z.cuda()
            kl = ext.kl_grad_(
                zs_gpu,
                zt[:, :width].contiguous().cuda(),
                coef.cuda(),
                2.0,
                None if mix is None else mix.cuda(),
                reverse,
                *(None if x is None else x.cuda() for x in extra),
            )
            zs_cpu = z.clone()
            want = twin.kl_grad_(zs_cpu, zt[:, :width].contiguous(), coef, 2.0, mix, reverse, *extra)
            assert_rel(kl.cpu(), want, 1e-4, what)
            assert_rel(zs_gpu.cpu().float(), zs_cpu.float(), tol, what + " grad")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ops_on_gpu_match_cpu_reference(dtype):
    _cuda_kernels()
    g = torch.Generator().manual_seed(0)
    b, l, h, v = 2, 300, 64, 32_003
    hidden, weight, bias = projection(g, (b, l), h, v, dtype, bias=True)
    targets = peaked_targets(g, hidden, weight)
    ids, num_chunks = chunk_layout(g, b, l, 4)
    mask, teacher = chunk_mask(g, b, num_chunks, "random"), -6 * torch.rand(b, num_chunks, generator=g)
    ht, wt, _ = projection(g, (b, l), 48, v + 10, dtype)
    masked = chunk_mask(g, b, l, "random")
    t = torch.rand(b, generator=g)
    cases = {
        "calm": lambda x, impl: fused_calm(
            x[0],
            x[1],
            targets.to(x[0].device),
            ids.to(x[0].device),
            teacher.to(x[0].device),
            mask.to(x[0].device),
            bias=x[2],
            impl=impl,
        ),
        "logprobs": lambda x, impl: target_logprobs(x[0], x[1], targets.to(x[0].device), bias=x[2], impl=impl)[0].sum(),
        "kl": lambda x, impl: fused_kl(
            x[0], x[1], ht.to(x[0].device), wt.to(x[0].device), masked.to(x[0].device), student_bias=x[2], impl=impl
        ),
        "tidal": lambda x, impl: fused_tidal(
            x[0],
            x[1],
            ht.to(x[0].device),
            wt.to(x[0].device),
            masked.to(x[0].device),
            t.to(x[0].device),
            0.5,
            student_bias=x[2],
            impl=impl,
        ),
    }
    rows_t = targets.reshape(-1)

    def head(x, impl):  # CE-like log-prob term without groups plus a KL term, as the step's pass-B call
        dev = x[0].device
        kl = kl_rows(ht.reshape(b * l, -1).to(dev), wt.to(dev), masked.reshape(-1).to(dev), temperature=1.5)
        return fused_head_loss(
            x[0].reshape(b * l, -1), x[1], rows_t.to(dev), lambda lp: -lp.mean(), kl=kl, bias=x[2], impl=impl
        )[0]

    cases["head"] = head
    for name, fn in cases.items():
        results = {}
        for device, impl in (("cpu", "reference"), ("cuda", "auto")):
            x = [p.detach().to(device).requires_grad_() for p in (hidden, weight, bias)]
            loss = fn(x, impl)
            loss.backward()
            results[device] = [loss.detach().cpu()] + [p.grad.cpu() for p in x]
        for got, want in zip(results["cuda"], results["cpu"]):
            assert_rel(got, want, max(TOL[dtype], 1e-4), name)


def test_fused_head_loss_refuses_mismatched_rows():
    hidden, weight, _ = projection(torch.Generator().manual_seed(0), (6,), 8, 50, torch.float32)
    with pytest.raises(ValueError, match="targets"):
        fused_head_loss(hidden, weight, None, lambda lp: lp.sum())
    with pytest.raises(ValueError, match="rows"):
        fused_head_loss(hidden.view(2, 3, 8), weight, torch.zeros(2, 3, dtype=torch.long), lambda lp: lp.sum())
    with pytest.raises(ValueError, match="student's 6 rows"):
        fused_head_loss(hidden, weight, None, kl=kl_rows(torch.zeros(5, 8), weight.detach()))
    with pytest.raises(ValueError, match="nothing to compute"):
        fused_head_loss(hidden, weight, None)
    with pytest.raises(ValueError, match="forward KL"):
        kl_rows(torch.zeros(6, 8), weight.detach(), reverse=True, lam=torch.rand(6))


def test_wheel_ships_the_kernel_sources(tmp_path):
    """A non-editable install carries the C++/CUDA sources, and the loader finds them there (not in
    a source checkout), so a wheel user on GPU gets the compiled op, not silently the twin."""
    import zipfile

    env = {**os.environ, "TIDE_DS_NO_CUDA_EXT": "1"}
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = tmp_path.glob("tide_ds-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("binding.cpp", "tide_kernels.cu", "tide_kernels.h", "tide_lse.h"):
        assert f"tide_ds/kernels/csrc/{f}" in names, f"{f} missing from {wheel.name}"
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what `pip install` of the wheel lays out
    probe = "from tide_ds.kernels import _ext; print(_ext.SOURCES); print(all(p.exists() for p in _ext.source_paths()))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**env, "PYTHONPATH": str(site)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    where, found = out.stdout.split()
    assert Path(where).is_relative_to(site) and found == "True", out.stdout
