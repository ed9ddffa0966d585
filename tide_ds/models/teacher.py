"""Teachers: frozen diffusion LMs that return final hidden states and expose their output head.

The objective reduces hidden states to what it needs (target log-probs or logits at masked
positions) through the output head, so no teacher ever returns [b, l, V] logits.
"""
from __future__ import annotations

import torch
from torch import nn


class HFBidirectionalTeacher(nn.Module):
    """Any transformers decoder or masked LM run with full bidirectional attention."""

    def __init__(self, model: nn.Module, mask_token_id: int):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.mask_token_id = mask_token_id

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    @property
    def output_bias(self) -> torch.Tensor | None:
        return getattr(self.model.get_output_embeddings(), "bias", None)

    @property
    def vocab_size(self) -> int:
        return self.output_weight.shape[0]

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[b, l, H]; attention_mask [b, l] bool hides padding keys, everything else is visible."""
        b, length = input_ids.shape
        dtype = self.output_weight.dtype
        mask = torch.zeros(b, 1, length, length, dtype=dtype, device=input_ids.device)
        if attention_mask is not None:
            mask.masked_fill_(~attention_mask[:, None, None, :], torch.finfo(dtype).min)
        decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.base_model
        return decoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
