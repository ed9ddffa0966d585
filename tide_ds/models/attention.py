"""Attention backends: run a transformers decoder with a block-diffusion pattern.

The rule and the per-backend mask objects live in `tide_ds.diffusion.layout`; this module picks
the backend and runs the decoder with the matching transformers attention implementation:

  sdpa   an additive float mask (trains on CPU; the reference path)
  flex   a FlexAttention BlockMask whose mask_mod is the same rule (GPU; forward only on CPU)
  flash  flash-attn, for calls where every query sees every key (the sampler's steps against the
         KV cache, one-block windows). flash-attn takes no arbitrary mask, so a call that needs
         the block-diffusion mask runs on flex instead.
  auto   flex on CUDA, sdpa elsewhere.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch

from tide_ds.config import ConfigError
from tide_ds.diffusion.layout import Pattern, attention_mask

Backend = Literal["auto", "sdpa", "flex", "flash"]
BACKENDS = ("auto", "sdpa", "flex", "flash")
_HF_IMPLEMENTATION = {"sdpa": "sdpa", "flex": "flex_attention", "flash": "flash_attention_2"}


def resolve_backend(name: str, device: torch.device | str, key: str = "attn_backend") -> str:
    """The concrete backend for a device; a clear error for an unknown name or missing flash-attn."""
    if name not in BACKENDS:
        raise ConfigError(f"{key} is {name!r}; choose one of {', '.join(map(repr, BACKENDS))}")
    if name == "auto":
        return "flex" if torch.device(device).type == "cuda" else "sdpa"
    if name == "flash" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            f"{key}='flash' needs the flash-attn package (pip install 'tide_ds[gpu]' on a CUDA "
            f"machine); use 'flex' or 'sdpa' instead"
        )
    return name


def run_decoder(
    model,
    backend: str,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    pattern: Pattern | None = None,
    *,
    key_padding: torch.Tensor | None = None,
    past_key_values=None,
) -> torch.Tensor:
    """Final hidden states of a transformers decoder (`model.get_decoder()`), every new query
    seeing every cached key and the new keys through `pattern` (None: all of them).

    A pattern indexes new queries [0, q) and keys [0, cached + q), so use one with an empty cache.
    `backend` is a name from BACKENDS; 'auto' picks by the input's device."""
    backend = resolve_backend(backend, input_ids.device)
    if backend == "flash" and (pattern is not None or key_padding is not None):
        backend = "flex"  # flash-attn has no arbitrary masks
    if model.config._attn_implementation != _HF_IMPLEMENTATION[backend]:
        model.set_attn_implementation(_HF_IMPLEMENTATION[backend])
    q_len = input_ids.shape[1]
    kv_len = q_len + (past_key_values.get_seq_length() if past_key_values is not None else 0)
    mask = attention_mask(
        backend, pattern, q_len, kv_len, dtype=model.dtype, device=input_ids.device, key_padding=key_padding
    )
    extra = {"is_causal": False} if backend == "flash" else {}
    out = model.get_decoder()(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=mask,
        past_key_values=past_key_values,
        use_cache=past_key_values is not None,
        **extra,
    )
    return out.last_hidden_state


class OutputHead:
    """The wrapped transformers model's output projection, which the tiled ops read directly."""

    model: torch.nn.Module

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    @property
    def output_bias(self) -> torch.Tensor | None:
        return getattr(self.model.get_output_embeddings(), "bias", None)
