"""Loss terms: each is a function of one shared `TermInputs`, registered by name.

The step computes what the recipe's terms need (declared in `needs`) once, then every term reads it.
Pipeline A (cross-tokenizer) and B (shared vocabulary) share the terms; where a term has a chunk
and a token form (TIDAL), the pipeline picks it. Two kinds:
- log-prob terms (CE, CALM, chunk TIDAL) are functions of the student's target log-probs;
- whole-distribution terms (KL, reverse KL, token TIDAL: the ones that need TEACHER_ROWS) return a
  `KLRows`, the per-row KL they sum, against the teacher's hidden states and head.
The step evaluates all of them in one tiled pass over the student's output projection
(`tide_ds.kernels.fused_head_loss`; `objective.kernels: reference` runs it on full logits).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tide_ds import kernels
from tide_ds.config import ObjectiveConfig
from tide_ds.objectives.calm import calm, chunk_tidal
from tide_ds.objectives.ce import bd3lm_ce
from tide_ds.objectives.kl import tidal_lambda, timestep_weighting

# What a term can ask the step for, beyond the student's per-token log-probs (always there):
TEACHER_ROWS = "teacher_rows"  # teacher hidden states at the student's masked rows (shared vocab)
CHUNKS = "chunks"  # student and teacher chunk log-probs [b, C] and the active-chunk mask


@dataclass
class Rows:
    """Hidden states at selected rows [n, H] and the output head that turns them into logits."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None


@dataclass
class TermInputs:
    cfg: ObjectiveConfig
    progress: float  # step / total_steps in [0, 1]
    t: torch.Tensor  # [b]
    masked: torch.Tensor  # [b, l] bool
    maskable: torch.Tensor  # [b, l] bool
    row_t: torch.Tensor  # [n] each masked row's t, in `masked.nonzero()` order
    student_token_logprobs: torch.Tensor | None = None  # [b, l] fp32, valid at masked positions
    cross_tokenizer: bool = False
    teacher: Rows | None = None  # at the masked rows
    row_valid: torch.Tensor | None = None  # [n] bool: the row has a teacher counterpart
    student_chunk_logprobs: torch.Tensor | None = None
    teacher_chunk_logprobs: torch.Tensor | None = None
    chunk_mask: torch.Tensor | None = None


def ce_term(x: TermInputs) -> torch.Tensor:
    return bd3lm_ce(x.student_token_logprobs, x.masked, x.maskable, x.t, x.cfg.ce_normalization)


def _kl_term(reverse: bool):
    def term(x: TermInputs) -> kernels.KLRows:
        te = x.teacher
        return kernels.kl_rows(te.hidden, te.weight, x.row_valid, temperature=x.cfg.temperature, reverse=reverse,
                               teacher_bias=te.bias)

    return term


def _calm_term(reverse: bool):
    def term(x: TermInputs) -> torch.Tensor:
        return calm(x.student_chunk_logprobs, x.teacher_chunk_logprobs, x.chunk_mask,
                    temperature=x.cfg.temperature, reverse=reverse)

    return term


def tidal_term(x: TermInputs) -> torch.Tensor | kernels.KLRows:
    c = x.cfg
    if x.cross_tokenizer:  # TIDAL over chunks, per-row lambda and weight from each sequence's t
        lam = tidal_lambda(x.t, x.progress, lambda_init=c.lambda_init, lambda_max=c.lambda_max,
                           schedule=c.tidal_schedule, axis=c.tidal_axis)
        return chunk_tidal(x.student_chunk_logprobs, x.teacher_chunk_logprobs, x.chunk_mask, lam,
                           weight=timestep_weighting(x.t, c.timestep_weight), temperature=c.temperature)
    te = x.teacher
    lam = tidal_lambda(x.row_t, x.progress, lambda_init=c.lambda_init, lambda_max=c.lambda_max,
                       schedule=c.tidal_schedule, axis=c.tidal_axis)
    return kernels.kl_rows(te.hidden, te.weight, x.row_valid, temperature=c.temperature, lam=lam,
                           row_weight=timestep_weighting(x.row_t, c.timestep_weight), teacher_bias=te.bias)


@dataclass(frozen=True)
class Term:
    fn: Callable[[TermInputs], torch.Tensor]
    needs: frozenset[str]
    shared_vocab_only: bool = False


TERMS: dict[str, Term] = {
    "ce": Term(ce_term, frozenset()),
    "kl": Term(_kl_term(reverse=False), frozenset({TEACHER_ROWS}), shared_vocab_only=True),
    "reverse_kl": Term(_kl_term(reverse=True), frozenset({TEACHER_ROWS}), shared_vocab_only=True),
    "calm": Term(_calm_term(reverse=False), frozenset({CHUNKS})),
    "reverse_calm": Term(_calm_term(reverse=True), frozenset({CHUNKS})),
    # token TIDAL needs the teacher's rows (shared vocab); chunk TIDAL (cross tokenizer) needs chunks
    "tidal": Term(tidal_term, frozenset({TEACHER_ROWS, CHUNKS})),
}


def term_needs(name: str, cross_tokenizer: bool) -> frozenset[str]:
    if name == "tidal":
        return frozenset({CHUNKS}) if cross_tokenizer else frozenset({TEACHER_ROWS})
    return TERMS[name].needs
