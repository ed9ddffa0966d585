"""Fused chunk-likelihood and shared-vocabulary ops: losses straight from hidden states and the
output projection, never holding [N, V] logits.

Layers (as in Liger-Kernel): row kernels (kernels/tide_kernels.cu, and their PyTorch twin
`tide_ds.kernels.twin`) -> tiled forward/backward functions and thin autograd.Functions
(`tide_ds.kernels.ops`) -> functional API (below) -> small modules.
"""

from tide_ds.kernels._ext import cuda_extension
from tide_ds.kernels.functional import (
    fused_calm,
    fused_chunk_loss,
    fused_head_loss,
    fused_kl,
    fused_tidal,
    kl_rows,
    target_logprobs,
)
from tide_ds.kernels.modules import FusedCALMLoss, FusedKLLoss
from tide_ds.kernels.ops import KLRows

__all__ = [
    "FusedCALMLoss",
    "FusedKLLoss",
    "KLRows",
    "cuda_extension",
    "fused_calm",
    "fused_chunk_loss",
    "fused_head_loss",
    "fused_kl",
    "fused_tidal",
    "kl_rows",
    "target_logprobs",
]
