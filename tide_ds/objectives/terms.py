"""Loss terms: each is a function of one shared `TermInputs`, registered by name.

The step computes what the recipe's terms need (declared in `needs`) once, then every term reads it.
Pipeline A (cross-tokenizer) and B (shared vocabulary) share the terms; where a term has a chunk
and a token form (TIDAL), the pipeline picks it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tide_ds.config import ObjectiveConfig
from tide_ds.objectives.calm import calm, chunk_tidal
from tide_ds.objectives.ce import bd3lm_ce
from tide_ds.objectives.kl import kl, tidal_kl, tidal_lambda, timestep_weighting

# What a term can ask the step for:
STUDENT_LOGITS = "student_logits"  # student logits at masked positions [n, V]
TEACHER_LOGITS = "teacher_logits"  # teacher logits at the same positions [n, V] (shared vocab only)
CHUNKS = "chunks"  # student and teacher chunk log-probs [b, C] and the active-chunk mask


@dataclass
class TermInputs:
    cfg: ObjectiveConfig
    progress: float  # step / total_steps in [0, 1]
    t: torch.Tensor  # [b]
    masked: torch.Tensor  # [b, l] bool
    maskable: torch.Tensor  # [b, l] bool
    student_token_logprobs: torch.Tensor  # [b, l] fp32, valid at masked positions
    cross_tokenizer: bool = False
    # masked positions flattened to rows: logits [n, V] and each row's sequence index [n]
    student_logits: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None
    row_seq: torch.Tensor | None = None
    # chunks
    student_chunk_logprobs: torch.Tensor | None = None
    teacher_chunk_logprobs: torch.Tensor | None = None
    chunk_mask: torch.Tensor | None = None

    def rows(self):
        """Masked rows as a batch of length-1 sequences: (student, teacher, masked, t) per row."""
        n = self.student_logits.shape[0]
        ones = torch.ones(n, 1, dtype=torch.bool, device=self.student_logits.device)
        return self.student_logits[:, None], self.teacher_logits[:, None], ones, self.t[self.row_seq]


def ce_term(x: TermInputs) -> torch.Tensor:
    return bd3lm_ce(x.student_token_logprobs, x.masked, x.maskable, x.t, x.cfg.ce_normalization)


def _kl_term(reverse: bool):
    def term(x: TermInputs) -> torch.Tensor:
        zs, zt, m, _ = x.rows()
        return kl(zs, zt, m, temperature=x.cfg.temperature, reverse=reverse)

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
    zs, zt, m, t = x.rows()
    return tidal_kl(zs, zt, m, t, x.progress, lambda_init=c.lambda_init, lambda_max=c.lambda_max,
                    schedule=c.tidal_schedule, axis=c.tidal_axis, timestep_weight=c.timestep_weight,
                    temperature=c.temperature)


@dataclass(frozen=True)
class Term:
    fn: Callable[[TermInputs], torch.Tensor]
    needs: frozenset[str]
    shared_vocab_only: bool = False


TERMS: dict[str, Term] = {
    "ce": Term(ce_term, frozenset()),
    "kl": Term(_kl_term(reverse=False), frozenset({STUDENT_LOGITS, TEACHER_LOGITS}), shared_vocab_only=True),
    "reverse_kl": Term(_kl_term(reverse=True), frozenset({STUDENT_LOGITS, TEACHER_LOGITS}), shared_vocab_only=True),
    "calm": Term(_calm_term(reverse=False), frozenset({CHUNKS})),
    "reverse_calm": Term(_calm_term(reverse=True), frozenset({CHUNKS})),
    # token TIDAL needs logits (shared vocab); chunk TIDAL (cross tokenizer) needs chunks
    "tidal": Term(tidal_term, frozenset({STUDENT_LOGITS, TEACHER_LOGITS, CHUNKS})),
}


def term_needs(name: str, cross_tokenizer: bool) -> frozenset[str]:
    if name == "tidal":
        return frozenset({CHUNKS}) if cross_tokenizer else frozenset({STUDENT_LOGITS, TEACHER_LOGITS})
    return TERMS[name].needs
