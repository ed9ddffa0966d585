"""TIDE objectives: BD3LM CE, KL, TIDAL, (Reverse) CALM, CompDemo.

These are the plain PyTorch references: the fused kernels in `tide_ds.kernels` are tested
against them.
"""

from tide_ds.config import RECIPES, Recipe
from tide_ds.objectives.calm import calm, chunk_logprobs, chunk_tidal
from tide_ds.objectives.ce import bd3lm_ce, fp32, token_logprobs
from tide_ds.objectives.compdemo import comp_demo_inputs, comp_demo_merge, comp_demo_split
from tide_ds.objectives.kl import kl, tidal_kl, tidal_lambda, timestep_weighting

__all__ = [
    "RECIPES",
    "Recipe",
    "bd3lm_ce",
    "calm",
    "chunk_logprobs",
    "chunk_tidal",
    "comp_demo_inputs",
    "comp_demo_merge",
    "comp_demo_split",
    "fp32",
    "kl",
    "tidal_kl",
    "tidal_lambda",
    "timestep_weighting",
    "token_logprobs",
]
