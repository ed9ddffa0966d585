import torch

from tide_ds.diffusion import (
    bd3lm_additive_mask,
    bd3lm_attention_mask,
    bd3lm_inputs,
    chunk_consistent_mask,
    loss_weight,
    noise_batch,
    pad_to_block_multiple,
    sample_t,
)


def reference_mask(length, block):
    """Written straight from the rule, one pair at a time."""
    m = torch.zeros(2 * length, 2 * length, dtype=torch.bool)
    for qi in range(2 * length):
        for ki in range(2 * length):
            q_xt, k_xt = qi < length, ki < length
            bq, bk = (qi % length) // block, (ki % length) // block
            if q_xt and k_xt:
                m[qi, ki] = bq == bk
            elif q_xt and not k_xt:
                m[qi, ki] = bk < bq
            elif not q_xt and not k_xt:
                m[qi, ki] = bk <= bq
            else:
                m[qi, ki] = False
    return m


def test_mask_matches_reference_including_ragged_blocks():
    for length, block in [(8, 4), (7, 3), (5, 1), (6, 6), (4, 8)]:
        assert torch.equal(bd3lm_attention_mask(length, block), reference_mask(length, block)), (length, block)


def test_mask_parts():
    length, block = 8, 4
    m = bd3lm_attention_mask(length, block)
    xt_xt, xt_x0, x0_xt, x0_x0 = m[:8, :8], m[:8, 8:], m[8:, :8], m[8:, 8:]
    assert not x0_xt.any()  # x_0 never attends to x_t
    assert torch.equal(xt_xt, torch.block_diag(torch.ones(4, 4), torch.ones(4, 4)).bool())
    assert not xt_x0[:4].any() and xt_x0[4:, :4].all() and not xt_x0[4:, 4:].any()
    assert torch.equal(x0_x0, torch.tensor([[1] * 4 + [0] * 4] * 4 + [[1] * 8] * 4).bool())


def test_additive_mask_and_layout():
    add = bd3lm_additive_mask(6, 2, torch.float32)
    assert add.shape == (1, 1, 12, 12)
    assert torch.equal(add[0, 0] == 0, bd3lm_attention_mask(6, 2))
    x_t, x0 = torch.full((2, 6), 9), torch.arange(12).view(2, 6)
    ids, pos, two = bd3lm_inputs(x_t, x0, 2)
    assert two and torch.equal(ids[:, 6:], x0) and torch.equal(pos[:, :6], pos[:, 6:])
    ids, pos, two = bd3lm_inputs(x_t, x0, 6)  # one block: x_0 is never read
    assert not two and torch.equal(ids, x_t)


def test_pad_to_block_multiple():
    ids = torch.ones(2, 5, dtype=torch.long)
    out = pad_to_block_multiple(ids, 4, 7)
    assert out.shape == (2, 8) and (out[:, 5:] == 7).all()
    assert pad_to_block_multiple(ids, 5, 7) is ids


def test_masked_fraction_tracks_t_and_prompt_never_masked():
    gen = torch.Generator().manual_seed(0)
    b, length = 4, 4000
    x0 = torch.randint(0, 50, (b, length), generator=gen)
    maskable = torch.ones(b, length, dtype=torch.bool)
    maskable[:, :500] = False  # prompt
    t = torch.tensor([0.05, 0.3, 0.6, 0.95])
    n = noise_batch(x0, maskable, 99, t=t, generator=gen)
    assert not n.masked[:, :500].any() and torch.equal(n.x_t[:, :500], x0[:, :500])
    frac = n.masked[:, 500:].float().mean(1)
    assert torch.allclose(frac, t, atol=0.03)
    assert torch.equal(n.x_t == 99, n.masked)
    # over many draws of t, the mean masked fraction is E[t] = (1 + eps) / 2
    ts = sample_t(20000, 1e-3, generator=gen)
    assert ts.min() >= 1e-3 and ts.max() < 1.0 and abs(ts.mean().item() - 0.5005) < 0.01
    assert torch.allclose(loss_weight(t), 1 / t)


def test_chunk_consistent_mask_closes_whole_chunks():
    gen = torch.Generator().manual_seed(1)
    chunk_ids = torch.tensor([[-1, 0, 0, 1, 1, 1, 2, -1, 3, 3]] * 3)
    for _ in range(20):
        masked = torch.rand(chunk_ids.shape, generator=gen) < 0.3
        out = chunk_consistent_mask(masked, chunk_ids)
        assert (out | ~masked).all()  # never unmasks
        for row in range(3):
            for c in range(4):
                sel = chunk_ids[row] == c
                want = masked[row][sel].any()
                assert (out[row][sel] == want).all()
            none = chunk_ids[row] == -1
            assert torch.equal(out[row][none], masked[row][none])
