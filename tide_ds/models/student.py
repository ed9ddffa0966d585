"""The BD3LM student: a transformers decoder (Qwen3 / Llama family) reading [x_t ; x_0].

The wrapped model stays a plain transformers model, so `save_pretrained` / `from_pretrained` work
unchanged; this class only builds the layout and the block-diffusion mask, and returns the hidden
states of the x_t half (the x_0 half's logits are never computed).
"""
from __future__ import annotations

import torch
from torch import nn

from tide_ds.diffusion import bd3lm_additive_mask, bd3lm_inputs


class BD3LMStudent(nn.Module):
    def __init__(self, model: nn.Module, block_size: int, mask_token_id: int):
        super().__init__()
        self.model = model
        self.block_size = block_size
        self.mask_token_id = mask_token_id

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    @property
    def output_bias(self) -> torch.Tensor | None:
        return getattr(self.model.get_output_embeddings(), "bias", None)

    def hidden_states(self, x_t: torch.Tensor, x_0: torch.Tensor) -> torch.Tensor:
        """Final hidden states of the x_t half, [b, l, H]."""
        length = x_t.shape[1]
        input_ids, position_ids, two_halves = bd3lm_inputs(x_t, x_0, self.block_size)
        dtype = self.output_weight.dtype
        mask = bd3lm_additive_mask(length, self.block_size, dtype, x_t.device, two_halves=two_halves)
        out = self.model.get_decoder()(input_ids=input_ids, position_ids=position_ids, attention_mask=mask)
        return out.last_hidden_state[:, :length]

    def forward(self, x_t: torch.Tensor, x_0: torch.Tensor) -> torch.Tensor:
        """Logits of the x_t half [b, l, V] (for evaluation and sampling; training uses hidden states)."""
        return self.model.get_output_embeddings()(self.hidden_states(x_t, x_0))
