"""The run's loss terms, resolved once: each with its kind, its weight and its hyper-parameters bound.

`resolve_terms(recipe, terms, pipeline)` turns the config's term names into `Term`s. Two kinds:
- LOGPROB terms (CE, CALM, chunk TIDAL) map the student's target log-probs (`TermInputs`) to a scalar;
- ROWS terms (KL, reverse KL, token TIDAL) return a `KLRows`, the per-row KL they sum, against the
  teacher's hidden states and head at the student's masked rows.
The step evaluates all of them in one tiled pass over the student's output projection
(`tide_ds.kernels.fused_head_loss`). TIDAL has a chunk form (pipeline A, two tokenizers) and a token
form (pipeline B, one vocabulary); the pipeline picks the form here, never in the step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from tide_ds import kernels
from tide_ds.config import RECIPES, ObjectiveConfig, TermConfig, TidalConfig, run_terms
from tide_ds.objectives import bd3lm_ce, calm, chunk_tidal, tidal_lambda, timestep_weighting

LOGPROB, ROWS = "logprob", "rows"
# What a term asks the step for, beyond the student's per-token log-probs (always there):
TEACHER_ROWS = "teacher_rows"  # teacher hidden states at the student's masked rows (shared vocab)
CHUNKS = "chunks"  # student and teacher chunk log-probs [b, C] and the active-chunk mask

Pipeline = Literal["shared", "cross"]


@dataclass
class Rows:
    """Hidden states at selected rows [n, H] and the output head that turns them into logits."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None


@dataclass
class TermInputs:
    """Tensors every term reads (plus the training progress, a number in [0, 1])."""

    progress: float
    t: torch.Tensor  # [b]
    masked: torch.Tensor  # [b, l] bool
    maskable: torch.Tensor  # [b, l] bool
    row_t: torch.Tensor  # [n] each masked row's t, in `masked.nonzero()` order
    student_token_logprobs: torch.Tensor | None = None  # [b, l] fp32, valid at masked positions
    teacher: Rows | None = None  # at the masked rows
    row_valid: torch.Tensor | None = None  # [n] bool: the row has a teacher counterpart
    student_chunk_logprobs: torch.Tensor | None = None
    teacher_chunk_logprobs: torch.Tensor | None = None
    chunk_mask: torch.Tensor | None = None


@dataclass(frozen=True)
class Term:
    name: str
    kind: str  # LOGPROB or ROWS
    weight: float
    fn: Callable[[TermInputs], torch.Tensor | kernels.KLRows]  # hyper-parameters bound
    needs: frozenset[str]
    shared_vocab_only: bool = False
    config: TermConfig | None = None  # the resolved hyper-parameters (for logs and the dry run)


@dataclass(frozen=True)
class RunTerms:
    terms: tuple[Term, ...]
    comp_demo: bool = False
    demo_ratio: float = 0.5

    @property
    def needs(self) -> frozenset[str]:
        return frozenset().union(*(t.needs for t in self.terms))

    @property
    def needs_teacher(self) -> bool:
        return any(t.name != "ce" for t in self.terms)

    def of_kind(self, kind: str) -> list[Term]:
        return [t for t in self.terms if t.kind == kind]


# -- term forms: each takes its hyper-parameters and returns a function of TermInputs ----------

def ce_term(normalization: str):
    return lambda x: bd3lm_ce(x.student_token_logprobs, x.masked, x.maskable, x.t, normalization)


def kl_term(temperature: float, reverse: bool):
    def term(x: TermInputs) -> kernels.KLRows:
        te = x.teacher
        return kernels.kl_rows(te.hidden, te.weight, x.row_valid, temperature=temperature, reverse=reverse,
                               teacher_bias=te.bias)

    return term


def calm_term(temperature: float, reverse: bool):
    return lambda x: calm(x.student_chunk_logprobs, x.teacher_chunk_logprobs, x.chunk_mask,
                          temperature=temperature, reverse=reverse)


def _lambda(t: torch.Tensor, progress: float, c: TidalConfig) -> torch.Tensor:
    return tidal_lambda(t, progress, lambda_init=c.lambda_init, lambda_max=c.lambda_max, schedule=c.schedule,
                        axis=c.axis)


def chunk_tidal_term(temperature: float, c: TidalConfig):
    """TIDAL over chunks, lambda and weight per row from each sequence's t."""
    return lambda x: chunk_tidal(x.student_chunk_logprobs, x.teacher_chunk_logprobs, x.chunk_mask,
                                 _lambda(x.t, x.progress, c), weight=timestep_weighting(x.t, c.timestep_weight),
                                 temperature=temperature)


def token_tidal_term(temperature: float, c: TidalConfig):
    """TIDAL over the shared vocabulary, lambda and weight per masked row."""
    def term(x: TermInputs) -> kernels.KLRows:
        te = x.teacher
        return kernels.kl_rows(te.hidden, te.weight, x.row_valid, temperature=temperature,
                               lam=_lambda(x.row_t, x.progress, c),
                               row_weight=timestep_weighting(x.row_t, c.timestep_weight), teacher_bias=te.bias)

    return term


def _bind(name: str, spec: TermConfig, pipeline: Pipeline, objective: ObjectiveConfig) -> Term:
    T = spec.temperature
    if name == "ce":
        return Term(name, LOGPROB, spec.weight, ce_term(objective.ce_normalization), frozenset(), config=spec)
    if name in ("kl", "reverse_kl"):
        return Term(name, ROWS, spec.weight, kl_term(T, reverse=name == "reverse_kl"), frozenset({TEACHER_ROWS}),
                    shared_vocab_only=True, config=spec)
    if name in ("calm", "reverse_calm"):
        return Term(name, LOGPROB, spec.weight, calm_term(T, reverse=name == "reverse_calm"), frozenset({CHUNKS}),
                    config=spec)
    if name == "tidal" and pipeline == "cross":
        return Term(name, LOGPROB, spec.weight, chunk_tidal_term(T, spec.tidal), frozenset({CHUNKS}), config=spec)
    if name == "tidal":
        return Term(name, ROWS, spec.weight, token_tidal_term(T, spec.tidal), frozenset({TEACHER_ROWS}), config=spec)
    raise AssertionError(f"term {name!r} is named in config.TERM_NAMES but has no form here")


def resolve_terms(recipe: str, terms: dict[str, float | TermConfig] | None = None, pipeline: Pipeline = "shared",
                  objective: ObjectiveConfig | None = None) -> RunTerms:
    """The run's terms (the recipe's, or the explicit `terms`), each bound to its form for `pipeline`
    ("shared": one vocabulary, "cross": two tokenizers) and to its hyper-parameters."""
    objective = objective or ObjectiveConfig()
    specs = run_terms(recipe, terms, objective)  # ConfigError on an unknown name or an empty loss
    bound = tuple(_bind(name, spec, pipeline, objective) for name, spec in specs.items())
    return RunTerms(bound, comp_demo=RECIPES[recipe].comp_demo, demo_ratio=objective.demo_ratio)
