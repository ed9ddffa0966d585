"""One distillation step, in three parts the scheduler can overlap:

  noise(batch)            -> Noised: x_t for student and teacher, the masked set, chunks, CompDemo split
  teacher_targets(noised) -> TeacherTargets: only what the recipe needs (no grad)
  loss(noised, targets)   -> scalar loss and detached per-term values

Both pipelines take the same path. A batch without teacher ids (same tokenizer, same template) is
given identity chunks, one per maskable token, so Reverse CALM in pipeline B and everything else
need no special case. All losses read rows at masked positions only: the student's x_0 half and its
unmasked positions are never projected to the vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tide_ds.config import ObjectiveConfig
from tide_ds.diffusion import chunk_masked, noise_batch, tokens_of_chunks
from tide_ds.objectives import (
    TERMS,
    Recipe,
    TermInputs,
    chunk_logprobs,
    comp_demo_inputs,
    comp_demo_merge,
    comp_demo_split,
    term_needs,
    token_logprobs,
)
from tide_ds.objectives.terms import CHUNKS, STUDENT_LOGITS, TEACHER_LOGITS


@dataclass
class Noised:
    x0: torch.Tensor  # [b, l] student clean ids
    x_t: torch.Tensor  # [b, l] student noised ids
    masked: torch.Tensor  # [b, l] bool
    maskable: torch.Tensor  # [b, l] bool
    t: torch.Tensor  # [b]
    chunk_ids: torch.Tensor  # [b, l]
    chunk_mask: torch.Tensor  # [b, C] bool: active (masked, non-prompt) chunks
    teacher_x0: torch.Tensor  # [b, lt]
    teacher_chunk_ids: torch.Tensor  # [b, lt]
    teacher_attention_mask: torch.Tensor | None
    teacher_pass_inputs: list[torch.Tensor]  # one teacher input per pass (two with CompDemo)
    teacher_pass_masked: torch.Tensor | None  # [b, lt] bool: positions masked in pass 1 (M_B)
    has_teacher_ids: bool  # the teacher reads its own token sequence (another tokenizer or template)


@dataclass
class TeacherTargets:
    logits: torch.Tensor | None = None  # [n, V] at the student's masked rows
    chunk_logprobs: torch.Tensor | None = None  # [b, C]


def identity_chunks(maskable: torch.Tensor) -> torch.Tensor:
    """One chunk per maskable token (chunk id = position), -1 elsewhere."""
    pos = torch.arange(maskable.shape[1], device=maskable.device).expand_as(maskable)
    return torch.where(maskable, pos, torch.full_like(pos, -1))


class DistillStep:
    def __init__(self, student, teacher, recipe: Recipe, objective: ObjectiveConfig, *,
                 cross_tokenizer: bool = False, eps: float = 1e-3):
        self.student = student
        self.teacher = teacher
        self.recipe = recipe
        self.cfg = objective
        self.cross_tokenizer = cross_tokenizer
        self.eps = eps
        self.needs = frozenset().union(*(term_needs(name, cross_tokenizer) for name, w in recipe.terms.items() if w > 0))

    # -- 1. noise ------------------------------------------------------------------------------
    def noise(self, batch: dict, generator: torch.Generator | None = None) -> Noised:
        x0, maskable = batch["input_ids"], batch["maskable"]
        own_ids = "teacher_input_ids" in batch
        chunk_ids = batch.get("chunk_ids")
        if chunk_ids is None:
            chunk_ids = identity_chunks(maskable)
        num_chunks = batch.get("num_chunks", x0.shape[1])
        n = noise_batch(x0, maskable, self.student.mask_token_id, eps=self.eps, chunk_ids=chunk_ids,
                        generator=generator)
        active = chunk_masked(n.masked, chunk_ids, num_chunks)
        if own_ids:
            teacher_x0, teacher_chunk_ids = batch["teacher_input_ids"], batch["teacher_chunk_ids"]
        else:
            teacher_x0, teacher_chunk_ids = x0, chunk_ids
        inputs, pass1_masked = self._teacher_inputs(teacher_x0, teacher_chunk_ids, active, generator)
        return Noised(
            x0=x0, x_t=n.x_t, masked=n.masked, maskable=maskable, t=n.t, chunk_ids=chunk_ids,
            chunk_mask=active, teacher_x0=teacher_x0, teacher_chunk_ids=teacher_chunk_ids,
            teacher_attention_mask=batch.get("teacher_attention_mask"), teacher_pass_inputs=inputs,
            teacher_pass_masked=pass1_masked, has_teacher_ids=own_ids,
        )

    def _teacher_inputs(self, teacher_x0, teacher_chunk_ids, active, generator):
        """The teacher sees the student's masked chunks masked; CompDemo splits them over two passes."""
        if self.teacher is None:
            return [], None
        mask_id = self.teacher.mask_token_id

        def masked_input(chunks):
            return torch.where(tokens_of_chunks(chunks, teacher_chunk_ids), mask_id, teacher_x0)

        if not self.recipe.comp_demo:
            return [masked_input(active)], None
        c_a, c_b = comp_demo_split(active, self.cfg.demo_ratio, generator=generator)
        # pass 1 masks M_B (M_A revealed), pass 2 masks M_A (M_B revealed)
        return [masked_input(c_b), masked_input(c_a)], tokens_of_chunks(c_b, teacher_chunk_ids)

    # -- 2. teacher ----------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_targets(self, noised: Noised) -> TeacherTargets:
        needs = self.needs
        if self.teacher is None or not (needs - {STUDENT_LOGITS}):
            return TeacherTargets()
        # The one teacher call site: one pass, or CompDemo's two passes merged per position.
        hidden = [self.teacher.hidden_states(x, noised.teacher_attention_mask, x0=noised.teacher_x0)
                  for x in noised.teacher_pass_inputs]
        h = hidden[0] if len(hidden) == 1 else comp_demo_merge(hidden[0], hidden[1], noised.teacher_pass_masked)
        w, bias = self.teacher.output_weight, self.teacher.output_bias
        out = TeacherTargets()
        if TEACHER_LOGITS in needs:
            rows = teacher_rows(noised)
            out.logits = project(h[rows], w, bias)
        if CHUNKS in needs:
            in_active = tokens_of_chunks(noised.chunk_mask, noised.teacher_chunk_ids)
            lp, _ = rows_logprobs(h, w, bias, noised.teacher_x0, in_active.nonzero(as_tuple=True))
            out.chunk_logprobs = chunk_logprobs(lp, noised.teacher_chunk_ids, noised.chunk_mask.shape[1])
        return out

    # -- 3. student loss -----------------------------------------------------------------------
    def loss(self, noised: Noised, targets: TeacherTargets, progress: float):
        needs = self.needs
        hidden = self.student.hidden_states(noised.x_t, noised.x0)
        rows = noised.masked.nonzero(as_tuple=True)  # sync point: the number of masked rows
        token_lp, logits = rows_logprobs(hidden, self.student.output_weight, self.student.output_bias, noised.x0, rows)
        x = TermInputs(
            cfg=self.cfg, progress=progress, t=noised.t, masked=noised.masked, maskable=noised.maskable,
            student_token_logprobs=token_lp, cross_tokenizer=self.cross_tokenizer,
        )
        if STUDENT_LOGITS in needs:
            x.student_logits, x.teacher_logits, x.row_seq = logits, targets.logits, rows[0]
        if CHUNKS in needs:
            x.student_chunk_logprobs = chunk_logprobs(token_lp, noised.chunk_ids, noised.chunk_mask.shape[1])
            x.teacher_chunk_logprobs = targets.chunk_logprobs
            x.chunk_mask = noised.chunk_mask
        values = {name: TERMS[name].fn(x) for name, w in self.recipe.terms.items() if w > 0}
        total = sum(self.recipe.terms[name] * v for name, v in values.items())
        return total, {name: v.detach() for name, v in values.items()}


def project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = hidden @ weight.T
    return logits if bias is None else logits + bias


def rows_logprobs(hidden, weight, bias, targets, rows):
    """Target log-probs at the given rows of [b, l, H] hidden states, scattered into a [b, l] tensor
    (0 elsewhere), and the rows' logits [n, V]. Only the rows are projected to the vocabulary."""
    logits = project(hidden[rows], weight, bias)
    lp = token_logprobs(logits, targets[rows])
    return torch.zeros(targets.shape, dtype=lp.dtype, device=lp.device).index_put(rows, lp), logits


def teacher_rows(noised: Noised):
    """Teacher positions matching the student's masked rows, through the shared chunk ids.

    Identity chunks (same tokenizer and template) give the same positions; otherwise each masked
    student token is matched to the teacher token of its (single-token) chunk."""
    rows = noised.masked.nonzero(as_tuple=True)
    if not noised.has_teacher_ids:
        return rows
    b, lt = noised.teacher_chunk_ids.shape
    num_chunks = noised.chunk_mask.shape[1]
    pos = torch.arange(lt, device=noised.teacher_chunk_ids.device).expand(b, lt)
    first_pos = torch.full((b, num_chunks + 1), lt - 1, dtype=torch.long, device=pos.device)
    first_pos.scatter_reduce_(1, noised.teacher_chunk_ids + 1, pos, reduce="amin")
    chunk = noised.chunk_ids[rows]
    return rows[0], first_pos[rows[0], chunk + 1]
