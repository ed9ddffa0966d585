"""TIDE objectives: BD3LM CE, KL, TIDAL, (Reverse) CALM, CompDemo; recipes as weighted terms.

These are the plain PyTorch references: the fused kernels in `tide_ds.kernels` are tested
against them.
"""
from tide_ds.objectives.calm import calm, chunk_logprobs, chunk_tidal
from tide_ds.objectives.ce import bd3lm_ce, token_logprobs
from tide_ds.objectives.compdemo import comp_demo_inputs, comp_demo_merge, comp_demo_split
from tide_ds.objectives.kl import kl, tidal_kl, tidal_lambda, timestep_weighting
from tide_ds.objectives.recipes import RECIPES, Recipe, needs_teacher, resolve_terms
from tide_ds.objectives.terms import TERMS, TermInputs, term_needs

__all__ = [
    "RECIPES",
    "Recipe",
    "TERMS",
    "TermInputs",
    "bd3lm_ce",
    "calm",
    "chunk_logprobs",
    "chunk_tidal",
    "comp_demo_inputs",
    "comp_demo_merge",
    "comp_demo_split",
    "kl",
    "needs_teacher",
    "resolve_terms",
    "term_needs",
    "tidal_kl",
    "tidal_lambda",
    "timestep_weighting",
    "token_logprobs",
]
