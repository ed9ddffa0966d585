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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from tide_ds import kernels
from tide_ds.config import TERM_NAMES, ObjectiveConfig, TermConfig, TidalConfig, run_terms, uses_comp_demo
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
        return kernels.kl_rows(
            te.hidden, te.weight, x.row_valid, temperature=temperature, reverse=reverse, teacher_bias=te.bias
        )

    return term


def calm_term(temperature: float, reverse: bool):
    return lambda x: calm(
        x.student_chunk_logprobs, x.teacher_chunk_logprobs, x.chunk_mask, temperature=temperature, reverse=reverse
    )


def _lambda(t: torch.Tensor, progress: float, c: TidalConfig) -> torch.Tensor:
    return tidal_lambda(
        t, progress, lambda_init=c.lambda_init, lambda_max=c.lambda_max, schedule=c.schedule, axis=c.axis
    )


def chunk_tidal_term(temperature: float, c: TidalConfig):
    """TIDAL over chunks, lambda and weight per row from each sequence's t."""
    return lambda x: chunk_tidal(
        x.student_chunk_logprobs,
        x.teacher_chunk_logprobs,
        x.chunk_mask,
        _lambda(x.t, x.progress, c),
        weight=timestep_weighting(x.t, c.timestep_weight),
        temperature=temperature,
    )


def token_tidal_term(temperature: float, c: TidalConfig):
    """TIDAL over the shared vocabulary, lambda and weight per masked row."""

    def term(x: TermInputs) -> kernels.KLRows:
        te = x.teacher
        return kernels.kl_rows(
            te.hidden,
            te.weight,
            x.row_valid,
            temperature=temperature,
            lam=_lambda(x.row_t, x.progress, c),
            row_weight=timestep_weighting(x.row_t, c.timestep_weight),
            teacher_bias=te.bias,
        )

    return term


@dataclass(frozen=True)
class Form:
    """How a term is computed: its kind, what it needs, and a builder binding its hyper-parameters."""

    kind: str
    needs: frozenset[str]
    build: Callable[[TermConfig, ObjectiveConfig], Callable[[TermInputs], torch.Tensor | kernels.KLRows]]
    shared_vocab_only: bool = False


def _same(form: Form) -> dict[str, Form]:
    return {"shared": form, "cross": form}


# The term registry: name -> its form per pipeline (only TIDAL's differ).
FORMS: dict[str, dict[str, Form]] = {
    "ce": _same(Form(LOGPROB, frozenset(), lambda s, o: ce_term(o.ce_normalization))),
    "kl": _same(Form(ROWS, frozenset({TEACHER_ROWS}), lambda s, o: kl_term(s.temperature, reverse=False), True)),
    "reverse_kl": _same(Form(ROWS, frozenset({TEACHER_ROWS}), lambda s, o: kl_term(s.temperature, reverse=True), True)),
    "calm": _same(Form(LOGPROB, frozenset({CHUNKS}), lambda s, o: calm_term(s.temperature, reverse=False))),
    "reverse_calm": _same(Form(LOGPROB, frozenset({CHUNKS}), lambda s, o: calm_term(s.temperature, reverse=True))),
    "tidal": {
        "cross": Form(LOGPROB, frozenset({CHUNKS}), lambda s, o: chunk_tidal_term(s.temperature, s.tidal)),
        "shared": Form(ROWS, frozenset({TEACHER_ROWS}), lambda s, o: token_tidal_term(s.temperature, s.tidal)),
    },
}
assert set(FORMS) == set(TERM_NAMES), "every term name in tide_ds.config has a form here"


def resolve_terms(
    recipe: str,
    terms: dict[str, float | TermConfig] | None = None,
    pipeline: Pipeline = "shared",
    objective: ObjectiveConfig | None = None,
) -> RunTerms:
    """The run's terms (the recipe's, or the explicit `terms`), each bound to its form for `pipeline`
    ("shared": one vocabulary, "cross": two tokenizers) and to its hyper-parameters."""
    objective = objective or ObjectiveConfig()
    specs = run_terms(recipe, terms, objective)  # ConfigError on an unknown name or an empty loss
    bound = []
    for name, spec in specs.items():
        form = FORMS[name][pipeline]
        bound.append(
            Term(name, form.kind, spec.weight, form.build(spec, objective), form.needs, form.shared_vocab_only, spec)
        )
    comp_demo = uses_comp_demo(recipe, specs, objective)
    return RunTerms(tuple(bound), comp_demo=comp_demo, demo_ratio=objective.demo_ratio)
