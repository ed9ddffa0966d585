"""The BD3LM layout: the student reads [x_t ; x_0] (length 2l) with position ids 0..l-1 in both halves.

Attention (True = may attend), blk(i) = block index of i inside its own half:
  x_t query i -> x_t key j  iff blk(i) == blk(j)   (block-diagonal)
  x_t query i -> x_0 key j  iff blk(j) <  blk(i)   (offset block-causal)
  x_0 query i -> x_0 key j  iff blk(j) <= blk(i)   (block-causal)
  x_0 query   -> x_t key:   never.
`bd3lm_rule` is the one definition of this rule; `attention_mask` turns it into what each
attention backend reads (a dense additive mask for SDPA, a BlockMask for FlexAttention).
`order="x0_xt"` puts the clean half first (a WeDLM-style teacher input); the rule is the same,
only the halves swap places.
With a single block the x_0 half is never read by x_t, so callers may drop it (plain bidirectional
masked diffusion); `bd3lm_inputs` does so.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

Order = Literal["xt_x0", "x0_xt"]


def bd3lm_rule(
    length: int, block_size: int, order: Order = "xt_x0"
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The mask rule as a function of (query index, key index) into the 2*length layout.

    Works on any broadcastable integer tensors: index grids for a dense mask, or the scalar
    indices FlexAttention passes to a mask_mod."""
    if length < 1 or block_size < 1:
        raise ValueError(f"length and block_size must be >= 1, got {length}, {block_size}")
    if order not in ("xt_x0", "x0_xt"):
        raise ValueError(f"order must be 'xt_x0' or 'x0_xt', got {order!r}")
    clean_second = order == "xt_x0"

    def allowed(q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        q_second, k_second = q_idx >= length, kv_idx >= length
        q_clean, k_clean = (q_second, k_second) if clean_second else (~q_second, ~k_second)
        q_blk = (q_idx - length * q_second.long()) // block_size
        k_blk = (kv_idx - length * k_second.long()) // block_size
        noisy_noisy = ~q_clean & ~k_clean & (q_blk == k_blk)
        noisy_clean = ~q_clean & k_clean & (k_blk < q_blk)
        clean_clean = q_clean & k_clean & (k_blk <= q_blk)
        return noisy_noisy | noisy_clean | clean_clean

    return allowed


def bd3lm_attention_mask(length: int, block_size: int, device=None, order: Order = "xt_x0") -> torch.Tensor:
    """Boolean [2*length, 2*length] mask for the two-half layout, True = may attend."""
    idx = torch.arange(2 * length, device=device)
    return bd3lm_rule(length, block_size, order)(idx[:, None], idx[None, :])


def bd3lm_additive_mask(
    length: int, block_size: int, dtype: torch.dtype, device=None, two_halves: bool = True, order: Order = "xt_x0"
) -> torch.Tensor:
    """The same mask as a [1, 1, L, L] additive float mask (0 / dtype min), the form SDPA and eager
    attention in transformers both read correctly. `two_halves=False` gives the single-block case
    (the noisy half alone)."""
    allowed = bd3lm_attention_mask(length, block_size, device=device, order=order)
    if not two_halves:
        start = 0 if order == "xt_x0" else length
        allowed = allowed[start : start + length, start : start + length]
    return additive(allowed, dtype)[None, None]


def additive(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Boolean mask -> additive float mask (0 where allowed, dtype min elsewhere)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


@dataclass(frozen=True)
class Pattern:
    """One use of the rule: a two-half layout of `length` tokens per half. `offset` shifts query
    and key indices into the layout (offset=length with order xt_x0 selects the clean half alone:
    block-causal attention over clean tokens, see `clean_prefix`)."""

    length: int
    block_size: int
    order: Order = "xt_x0"
    offset: int = 0

    def rule(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        allowed, o = bd3lm_rule(self.length, self.block_size, self.order), self.offset
        return allowed if o == 0 else (lambda q, k: allowed(q + o, k + o))


def clean_prefix(length: int, block_size: int) -> Pattern:
    """Block-causal attention over `length` clean tokens (the x_0 half alone)."""
    return Pattern(length, block_size, "xt_x0", offset=length)


def attention_mask(
    backend: str,
    pattern: Pattern | None,
    q_len: int,
    kv_len: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    key_padding: torch.Tensor | None = None,
):
    """The mask object an attention backend reads for `pattern` (None: every query sees every key).

    sdpa: additive float [1 or b, 1, q_len, kv_len]; flex: a FlexAttention BlockMask with the rule
    as its mask_mod; flash: None (it runs only calls without a mask). key_padding [b, kv_len]
    (True = a real token) hides padding keys. Masks without padding are cached."""
    if backend == "sdpa":
        mask = _dense_mask(pattern, q_len, kv_len, dtype, torch.device(device))
        if key_padding is not None:
            keep = key_padding.bool()[:, None, None, :]
            mask = torch.where(keep, mask, torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=mask.device))
        return mask
    if backend == "flex":
        if key_padding is not None:
            return _block_mask(pattern, q_len, kv_len, torch.device(device), key_padding.bool())
        return _cached_block_mask(pattern, q_len, kv_len, torch.device(device))
    if backend == "flash":
        if pattern is not None or key_padding is not None:
            raise ValueError("flash-attn runs only calls without a mask; use flex or sdpa for this pattern")
        return None
    raise ValueError(f"unknown attention backend {backend!r}")


@functools.lru_cache(maxsize=16)
def _dense_mask(pattern: Pattern | None, q_len: int, kv_len: int, dtype: torch.dtype, device: torch.device):
    if pattern is None:
        return torch.zeros(1, 1, q_len, kv_len, dtype=dtype, device=device)
    q = torch.arange(q_len, device=device)[:, None]
    k = torch.arange(kv_len, device=device)[None, :]
    return additive(pattern.rule()(q, k), dtype)[None, None]


def _block_mask(
    pattern: Pattern | None, q_len: int, kv_len: int, device: torch.device, keep: torch.Tensor | None = None
):
    from torch.nn.attention.flex_attention import create_block_mask

    rule = pattern.rule() if pattern is not None else (lambda q, k: q >= 0)
    if keep is None:
        return create_block_mask(lambda b, h, q, k: rule(q, k), None, None, q_len, kv_len, device=device)
    return create_block_mask(
        lambda b, h, q, k: rule(q, k) & keep[b, k], keep.shape[0], None, q_len, kv_len, device=device
    )


_cached_block_mask = functools.lru_cache(maxsize=16)(_block_mask)


def bd3lm_inputs(
    x_t: torch.Tensor, x_0: torch.Tensor, block_size: int, order: Order = "xt_x0"
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Builds (input_ids, position_ids, two_halves) for a block-diffusion model.

    input_ids is [x_t ; x_0] (or [x_0 ; x_t]) along the sequence ([b, 2l]) with position ids
    repeated, or just x_t when the whole sequence is one block (x_0 would never be attended to)."""
    b, length = x_t.shape
    pos = torch.arange(length, device=x_t.device).expand(b, length)
    if length <= block_size:
        return x_t, pos, False
    halves = [x_t, x_0] if order == "xt_x0" else [x_0, x_t]
    return torch.cat(halves, dim=1), torch.cat([pos, pos], dim=1), True


def noisy_half(hidden: torch.Tensor, length: int, two_halves: bool, order: Order = "xt_x0") -> torch.Tensor:
    """The x_t half of a model output laid out by `bd3lm_inputs`."""
    if not two_halves or order == "xt_x0":
        return hidden[:, :length]
    return hidden[:, length:]


def pad_to_block_multiple(ids: torch.Tensor, block_size: int, value: int) -> torch.Tensor:
    """Right-pads the last dimension with `value` up to a multiple of block_size (EOS padding)."""
    length = ids.shape[-1]
    target = -(-length // block_size) * block_size
    if target == length:
        return ids
    return torch.cat([ids, ids.new_full((*ids.shape[:-1], target - length), value)], dim=-1)
