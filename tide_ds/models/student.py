"""The BD3LM student: a transformers decoder (Qwen3 / Llama family) reading [x_t ; x_0].

The wrapped model stays a plain transformers model, so `save_pretrained` / `from_pretrained` work
unchanged; this class only builds the layout and the block-diffusion mask, and returns the hidden
states of the x_t half (the x_0 half's logits are never computed). The block size and mask token
id are written into the model config (`config.bd3lm`), so a saved student generates without
extra flags.
"""

from __future__ import annotations

import torch
from torch import nn

from tide_ds.diffusion import bd3lm_inputs
from tide_ds.diffusion.layout import Pattern
from tide_ds.models.attention import OutputHead, resolve_backend, run_decoder


class BD3LMStudent(OutputHead, nn.Module):
    def __init__(self, model: nn.Module, block_size: int, mask_token_id: int, attn_backend: str = "auto"):
        super().__init__()
        resolve_backend(attn_backend, "cpu", key="student.attn_backend")  # fail early on a bad name
        self.model = model
        self.block_size = block_size
        self.mask_token_id = mask_token_id
        self.attn_backend = attn_backend
        model.config.bd3lm = {"block_size": block_size, "mask_token_id": mask_token_id}

    def checkpoint_activations(self) -> None:
        """Keep no activations inside the decoder layers: each layer's forward runs again in the
        backward (engine.activation_checkpointing). transformers' own activation checkpointing,
        non-reentrant: it checkpoints each layer's forward with its arguments (the [x_t ; x_0] mask
        and positions included), and each submodule is called again with its hooks, so ZeRO-3 gathers
        the layer's parameters for the recomputation too. It acts in training mode only, so the
        student is put in it (evaluation, under no_grad, keeps its activations as before)."""
        self.model.activation_checkpointing_enable({"use_reentrant": False})
        self.train()

    @property
    def max_length(self) -> int:
        """Longest sequence (positions) the backbone was configured for."""
        return getattr(self.model.config, "max_position_embeddings", None) or 1 << 30

    def hidden_states(self, x_t: torch.Tensor, x_0: torch.Tensor) -> torch.Tensor:
        """Final hidden states of the x_t half, [b, l, H]."""
        length = x_t.shape[1]
        input_ids, position_ids, two_halves = bd3lm_inputs(x_t, x_0, self.block_size)
        pattern = Pattern(length, self.block_size) if two_halves else None
        hidden = run_decoder(self.model, self.attn_backend, input_ids, position_ids, pattern)
        return hidden[:, :length]

    def forward(self, x_t: torch.Tensor, x_0: torch.Tensor) -> torch.Tensor:
        """Logits of the x_t half [b, l, V] (for evaluation and sampling; training uses hidden states)."""
        return self.model.get_output_embeddings()(self.hidden_states(x_t, x_0))

    def extend(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache,
        pattern: Pattern | None = None,
        key_padding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states of new tokens that see every cached (clean) key, and each other through
        `pattern` (None: all of them); their keys and values are appended to `cache`.

        The sampler's building block: a noisy block against the clean context, or a block just
        decoded being added to the context. key_padding [b, cached + new] (True = a real token) hides
        padding keys."""
        return run_decoder(
            self.model,
            self.attn_backend,
            input_ids,
            position_ids,
            pattern,
            key_padding=key_padding,
            past_key_values=cache,
        )
