"""The BD3LM layout: the student reads [x_t ; x_0] (length 2l) with position ids 0..l-1 in both halves.

Attention (True = may attend), blk(i) = block index of i inside its own half:
  x_t query i -> x_t key j  iff blk(i) == blk(j)   (block-diagonal)
  x_t query i -> x_0 key j  iff blk(j) <  blk(i)   (offset block-causal)
  x_0 query i -> x_0 key j  iff blk(j) <= blk(i)   (block-causal)
  x_0 query   -> x_t key:   never.
With a single block the x_0 half is never read by x_t, so callers may drop it (plain bidirectional
masked diffusion); `bd3lm_inputs` does so.
"""
from __future__ import annotations

import torch


def bd3lm_attention_mask(length: int, block_size: int, device=None) -> torch.Tensor:
    """Boolean [2*length, 2*length] mask for the [x_t ; x_0] layout, True = may attend."""
    if length < 1 or block_size < 1:
        raise ValueError(f"length and block_size must be >= 1, got {length}, {block_size}")
    blk = torch.arange(length, device=device) // block_size
    q, k = blk[:, None], blk[None, :]
    xt_xt = q == k
    xt_x0 = k < q
    x0_x0 = k <= q
    x0_xt = torch.zeros_like(xt_xt)
    top = torch.cat([xt_xt, xt_x0], dim=1)
    bottom = torch.cat([x0_xt, x0_x0], dim=1)
    return torch.cat([top, bottom], dim=0)


def bd3lm_additive_mask(length: int, block_size: int, dtype: torch.dtype, device=None,
                        two_halves: bool = True) -> torch.Tensor:
    """The same mask as a [1, 1, L, L] additive float mask (0 / dtype min), the form SDPA and eager
    attention in transformers both read correctly. `two_halves=False` gives the single-block case."""
    allowed = bd3lm_attention_mask(length, block_size, device=device)
    if not two_halves:
        allowed = allowed[:length, :length]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def bd3lm_inputs(x_t: torch.Tensor, x_0: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Builds (input_ids, position_ids, two_halves) for the student.

    input_ids is [x_t ; x_0] along the sequence ([b, 2l]) with position ids repeated, or just x_t
    when the whole sequence is one block (x_0 would never be attended to)."""
    b, length = x_t.shape
    pos = torch.arange(length, device=x_t.device).expand(b, length)
    if length <= block_size:
        return x_t, pos, False
    return torch.cat([x_t, x_0], dim=1), torch.cat([pos, pos], dim=1), True


def pad_to_block_multiple(ids: torch.Tensor, block_size: int, value: int) -> torch.Tensor:
    """Right-pads the last dimension with `value` up to a multiple of block_size (EOS padding)."""
    length = ids.shape[-1]
    target = -(-length // block_size) * block_size
    if target == length:
        return ids
    return torch.cat([ids, ids.new_full((*ids.shape[:-1], target - length), value)], dim=-1)
