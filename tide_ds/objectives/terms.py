"""Loss terms: each is a function of one shared `TermInputs`, registered by name.

The step computes what the recipe's terms need (declared in `needs`) once, then every term reads it.
Pipeline A (cross-tokenizer) and B (shared vocabulary) share the terms; where a term has a chunk
and a token form (TIDAL), the pipeline picks it. Terms that need whole distributions (KL, TIDAL)
receive hidden states and output heads, and evaluate through the tiled ops of `tide_ds.kernels`
(`objective.kernels: reference` runs the plain objectives instead).
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
    student_token_logprobs: torch.Tensor  # [b, l] fp32, valid at masked positions
    student: Rows  # at the masked rows, in `masked.nonzero()` order
    row_t: torch.Tensor  # [n] each masked row's t
    cross_tokenizer: bool = False
    teacher: Rows | None = None  # at the same rows
    row_valid: torch.Tensor | None = None  # [n] bool: the row has a teacher counterpart
    student_chunk_logprobs: torch.Tensor | None = None
    teacher_chunk_logprobs: torch.Tensor | None = None
    chunk_mask: torch.Tensor | None = None


def ce_term(x: TermInputs) -> torch.Tensor:
    return bd3lm_ce(x.student_token_logprobs, x.masked, x.maskable, x.t, x.cfg.ce_normalization)


def _kl_term(reverse: bool):
    def term(x: TermInputs) -> torch.Tensor:
        s, te = x.student, x.teacher
        return kernels.fused_kl(s.hidden, s.weight, te.hidden, te.weight, x.row_valid, temperature=x.cfg.temperature,
                                reverse=reverse, student_bias=s.bias, teacher_bias=te.bias, impl=x.cfg.kernels)

    return term


def _calm_term(reverse: bool):
    def term(x: TermInputs) -> torch.Tensor:
        return calm(x.student_chunk_logprobs, x.teacher_chunk_logprobs, x.chunk_mask,
                    temperature=x.cfg.temperature, reverse=reverse)

    return term


def tidal_term(x: TermInputs) -> torch.Tensor:
    c = x.cfg
    if x.cross_tokenizer:  # TIDAL over chunks, per-row lambda and weight from each sequence's t
        lam = tidal_lambda(x.t, x.progress, lambda_init=c.lambda_init, lambda_max=c.lambda_max,
                           schedule=c.tidal_schedule, axis=c.tidal_axis)
        return chunk_tidal(x.student_chunk_logprobs, x.teacher_chunk_logprobs, x.chunk_mask, lam,
                           weight=timestep_weighting(x.t, c.timestep_weight), temperature=c.temperature)
    s, te = x.student, x.teacher
    return kernels.fused_tidal(s.hidden, s.weight, te.hidden, te.weight, x.row_valid, x.row_t, x.progress,
                               lambda_init=c.lambda_init, lambda_max=c.lambda_max, schedule=c.tidal_schedule,
                               axis=c.tidal_axis, timestep_weight=c.timestep_weight, temperature=c.temperature,
                               student_bias=s.bias, teacher_bias=te.bias, impl=c.kernels)


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
