"""Teachers: frozen diffusion LMs that return final hidden states and expose their output head.

The interface every teacher keeps, and the only one the training step uses:
  hidden_states(input_ids, attention_mask=None, x0=None) -> [b, l, H]
  output_weight [V, H], output_bias [V] or None, vocab_size, mask_token_id
  x0 (the clean sequence) is read only by teachers fed the block-diffusion layout (WeDLM-style)
The objective reduces hidden states to what it needs through the output head: per-token target
log-probs (CALM) or the distributions at masked rows (KL / TIDAL), with the tiled ops of
`tide_ds.kernels`, so no
teacher ever materialises [b, l, V] logits.

Three teachers:
  LLaDA2Teacher           the LLaDA2-style MoE (`tide_ds.models.llada2`), bidirectional by design
  WeDLMTeacher            a dense decoder fed the block-diffusion layout and mask ([x_0 ; x_t] or
                          [x_t ; x_0]); returns the x_t half
  HFBidirectionalTeacher  any transformers decoder run with full bidirectional attention, or a
                          masked LM (its own bidirectional encoder, then its head's transform)
"""

from __future__ import annotations

import torch
from torch import nn

from tide_ds.diffusion.layout import Order, Pattern, bd3lm_inputs, noisy_half
from tide_ds.models.attention import OutputHead, resolve_backend, run_decoder


class Teacher(OutputHead, nn.Module):
    """A frozen model plus its output head; subclasses define `hidden_states`."""

    def __init__(self, model: nn.Module, mask_token_id: int):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.mask_token_id = mask_token_id

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: dropout stays off whatever the caller asks

    @property
    def vocab_size(self) -> int:
        return self.output_weight.shape[0]

    def hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, x0: torch.Tensor | None = None
    ) -> torch.Tensor:
        raise NotImplementedError


class LLaDA2Teacher(Teacher):
    """The LLaDA2-style MoE: bidirectional by design; attention_mask [b, l] hides padding keys."""

    def hidden_states(self, input_ids, attention_mask=None, x0=None):
        return self.model.get_decoder()(input_ids, attention_mask=attention_mask).last_hidden_state


class HFBidirectionalTeacher(Teacher):
    """Any transformers decoder with full bidirectional attention, or a masked LM (`*ForMaskedLM`)
    whose encoder is bidirectional already. For a masked LM the hidden states are the input of its
    output projection (after the head's transform), captured without computing logits."""

    def __init__(self, model: nn.Module, mask_token_id: int, attn_backend: str = "auto"):
        super().__init__(model, mask_token_id)
        resolve_backend(attn_backend, "cpu", key="teacher.attn_backend")
        self.attn_backend = attn_backend
        self.masked_lm = type(model).__name__.endswith("ForMaskedLM")

    def hidden_states(self, input_ids, attention_mask=None, x0=None):
        if self.masked_lm:
            return head_input(self.model, input_ids=input_ids, attention_mask=attention_mask)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return run_decoder(self.model, self.attn_backend, input_ids, pos, key_padding=attention_mask)


class WeDLMTeacher(Teacher):
    """A dense decoder (WeDLM-style) reading the noised and the clean sequence side by side with the
    block-diffusion mask; `order` "x0_xt" puts the clean half first. Returns the x_t half."""

    def __init__(
        self, model: nn.Module, mask_token_id: int, block_size: int, order: Order = "x0_xt", attn_backend: str = "auto"
    ):
        super().__init__(model, mask_token_id)
        resolve_backend(attn_backend, "cpu", key="teacher.attn_backend")
        self.block_size, self.order, self.attn_backend = block_size, order, attn_backend

    def hidden_states(self, input_ids, attention_mask=None, x0=None):
        if x0 is None:
            raise ValueError("the WeDLM-style teacher reads the clean sequence too: pass x0")
        length = input_ids.shape[1]
        ids, pos, two_halves = bd3lm_inputs(input_ids, x0, self.block_size, self.order)
        pattern = Pattern(length, self.block_size, self.order) if two_halves else None
        padding = attention_mask
        if attention_mask is not None and two_halves:
            padding = torch.cat([attention_mask, attention_mask], dim=1)
        hidden = run_decoder(self.model, self.attn_backend, ids, pos, pattern, key_padding=padding)
        return noisy_half(hidden, length, two_halves, self.order)


class _Captured(Exception):
    pass


def head_input(model: nn.Module, **inputs) -> torch.Tensor:
    """The tensor `model`'s output projection receives, without running the projection: a
    forward pre-hook records it and stops the forward."""
    captured = []

    def hook(module, args):
        captured.append(args[0])
        raise _Captured

    handle = model.get_output_embeddings().register_forward_pre_hook(hook)
    try:
        model(**inputs)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{type(model).__name__} never called its output embeddings")
    return captured[0]
