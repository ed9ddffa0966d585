"""Masked (block) diffusion: schedule, noising, the BD3LM [x_t ; x_0] layout and its attention mask.

Every recipe uses these functions; no objective re-implements them.
"""

from tide_ds.diffusion.layout import (
    Pattern,
    additive,
    attention_mask,
    bd3lm_additive_mask,
    bd3lm_attention_mask,
    bd3lm_inputs,
    bd3lm_rule,
    clean_prefix,
    noisy_half,
    pad_to_block_multiple,
)
from tide_ds.diffusion.noise import (
    NoisedBatch,
    RowStreams,
    chunk_consistent_mask,
    chunk_masked,
    loss_weight,
    mask_probability,
    noise_batch,
    sample_t,
    tokens_of_chunks,
    uniform,
)

__all__ = [
    "NoisedBatch",
    "Pattern",
    "RowStreams",
    "additive",
    "attention_mask",
    "bd3lm_additive_mask",
    "bd3lm_attention_mask",
    "bd3lm_inputs",
    "bd3lm_rule",
    "chunk_consistent_mask",
    "clean_prefix",
    "chunk_masked",
    "loss_weight",
    "mask_probability",
    "noisy_half",
    "noise_batch",
    "pad_to_block_multiple",
    "sample_t",
    "tokens_of_chunks",
    "uniform",
]
