"""One distillation step, in three parts that the schedulers (`pipeline/schedule.py`) can overlap:

  noise(batch)            -> Noised: x_t for student and teacher, the masked set, chunks, CompDemo split
  teacher_targets(noised) -> TeacherTargets: only what the recipe needs (no grad)
  loss(noised, targets)   -> scalar loss and detached per-term values

Both pipelines take the same path. A batch without teacher ids (same tokenizer, same template) is
given identity chunks, one per maskable token, so Reverse CALM in pipeline B and everything else
need no special case. All losses read rows at masked positions only: the student's x_0 half and its
unmasked positions are never projected to the vocabulary, and the masked rows are projected in one
tiled pass that yields every term's value and gradient (`tide_ds.kernels.fused_head_loss`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass

import torch

from tide_ds import kernels
from tide_ds.diffusion import chunk_masked, noise_batch, tokens_of_chunks
from tide_ds.objectives import chunk_logprobs, comp_demo_inputs, comp_demo_merge, comp_demo_split
from tide_ds.pipeline.terms import CHUNKS, LOGPROB, ROWS, TEACHER_ROWS, Rows, RunTerms, TermInputs


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
    stored: TeacherTargets | None = None  # read from a `tide-ds teach` directory (no teacher is called)

    @functools.cached_property
    def masked_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """masked.nonzero(as_tuple=True), found once for the teacher call and the loss (a host sync)."""
        return self.masked.nonzero(as_tuple=True)


@dataclass
class TeacherTargets:
    rows: Rows | None = None  # teacher hidden states at the student's masked rows, with its head
    row_valid: torch.Tensor | None = None  # [n] bool, rows with a teacher counterpart (None: all)
    chunk_logprobs: torch.Tensor | None = None  # [b, C]


def identity_chunks(maskable: torch.Tensor) -> torch.Tensor:
    """One chunk per maskable token (chunk id = position), -1 elsewhere."""
    pos = torch.arange(maskable.shape[1], device=maskable.device).expand_as(maskable)
    return torch.where(maskable, pos, torch.full_like(pos, -1))


class DistillStep:
    def __init__(
        self, student, teacher, terms: RunTerms, *, kernels: str = "auto", eps: float = 1e-3, shared_vocab_size: int = 0
    ):
        self.student = student
        self.teacher = teacher
        self.terms = terms
        self.kernels = kernels  # "auto", "twin" or "reference" (objective.kernels)
        self.eps = eps
        self.shared_vocab_size = shared_vocab_size  # KL / TIDAL compare ids below it (0: all shared ids)
        self.needs = terms.needs

    def with_teacher(self, teacher) -> DistillStep:
        """A copy of this step that calls `teacher` (a placed one), sharing everything else."""
        placed = copy.copy(self)
        placed.teacher = teacher
        return placed

    # -- 1. noise ------------------------------------------------------------------------------
    def noise(self, batch: dict, generator: torch.Generator | None = None) -> Noised:
        x0, maskable = batch["input_ids"], batch["maskable"]
        own_ids = "teacher_input_ids" in batch
        chunk_ids = batch.get("chunk_ids")
        if chunk_ids is None:
            chunk_ids = identity_chunks(maskable)
        num_chunks = batch.get("num_chunks", x0.shape[1])
        n = noise_batch(
            x0, maskable, self.student.mask_token_id, eps=self.eps, chunk_ids=chunk_ids, generator=generator
        )
        active = chunk_masked(n.masked, chunk_ids, num_chunks)
        if own_ids:
            teacher_x0, teacher_chunk_ids = batch["teacher_input_ids"], batch["teacher_chunk_ids"]
        else:
            teacher_x0, teacher_chunk_ids = x0, chunk_ids
        inputs, pass1_masked = self._teacher_inputs(teacher_x0, teacher_chunk_ids, active, generator)
        return Noised(
            x0=x0,
            x_t=n.x_t,
            masked=n.masked,
            maskable=maskable,
            t=n.t,
            chunk_ids=chunk_ids,
            chunk_mask=active,
            teacher_x0=teacher_x0,
            teacher_chunk_ids=teacher_chunk_ids,
            teacher_attention_mask=batch.get("teacher_attention_mask"),
            teacher_pass_inputs=inputs,
            teacher_pass_masked=pass1_masked,
            has_teacher_ids=own_ids,
        )

    def _teacher_inputs(self, teacher_x0, teacher_chunk_ids, active, generator):
        """The teacher sees the student's masked chunks masked; CompDemo splits them over two passes."""
        if self.teacher is None:
            return [], None
        x_t = torch.where(tokens_of_chunks(active, teacher_chunk_ids), self.teacher.mask_token_id, teacher_x0)
        if not self.terms.comp_demo:
            return [x_t], None
        c_a, c_b = comp_demo_split(active, self.terms.demo_ratio, generator=generator)
        m_a, m_b = tokens_of_chunks(c_a, teacher_chunk_ids), tokens_of_chunks(c_b, teacher_chunk_ids)
        # pass 1 masks M_B (M_A revealed), pass 2 masks M_A (M_B revealed)
        return list(comp_demo_inputs(x_t, teacher_x0, m_a, m_b)), m_b

    # -- 2. teacher ----------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_targets(self, noised: Noised) -> TeacherTargets:
        if noised.stored is not None:
            return noised.stored
        if self.teacher is None or not self.needs:
            return TeacherTargets()
        # The one teacher call site: one pass, or CompDemo's two passes merged per position.
        hidden = [
            self.teacher.hidden_states(x, noised.teacher_attention_mask, x0=noised.teacher_x0)
            for x in noised.teacher_pass_inputs
        ]
        h = hidden[0] if len(hidden) == 1 else comp_demo_merge(hidden[0], hidden[1], noised.teacher_pass_masked)
        w, bias = self.teacher.output_weight, self.teacher.output_bias
        out = TeacherTargets()
        if TEACHER_ROWS in self.needs:
            rows, out.row_valid = teacher_rows(noised)
            v = self.shared_vocab_size or w.shape[0]  # the KL's id range is min(V_student, teacher rows)
            out.rows = Rows(h[rows], w[:v], None if bias is None else bias[:v])
        if CHUNKS in self.needs:
            rows = tokens_of_chunks(noised.chunk_mask, noised.teacher_chunk_ids).nonzero(as_tuple=True)
            lp = self.row_logprobs(Rows(h[rows], w, bias), noised.teacher_x0, rows)
            out.chunk_logprobs = chunk_logprobs(lp, noised.teacher_chunk_ids, noised.chunk_mask.shape[1])
        return out

    # -- 3. student loss -----------------------------------------------------------------------
    def loss(self, noised: Noised, targets: TeacherTargets, progress: float):
        """The recipe's weighted terms, from one tiled pass over the student's output projection at
        its masked rows (gradients computed during that pass). Returns (loss, detached term values)."""
        hidden = self.student.hidden_states(noised.x_t, noised.x0)
        rows = noised.masked_rows
        x = TermInputs(
            progress=progress,
            t=noised.t,
            masked=noised.masked,
            maskable=noised.maskable,
            row_t=noised.t[rows[0]],
            teacher=targets.rows,
            row_valid=targets.row_valid,
        )
        groups, num_chunks = None, noised.chunk_mask.shape[1]
        if CHUNKS in self.needs:
            x.teacher_chunk_logprobs, x.chunk_mask = targets.chunk_logprobs, noised.chunk_mask
            chunk = noised.chunk_ids[rows]  # a row's log-prob gradient waits for the rest of its chunk
            groups = torch.where(chunk >= 0, rows[0] * num_chunks + chunk, -1)
        whole, by_logprob = self.terms.of_kind(ROWS), self.terms.of_kind(LOGPROB)

        def with_logprobs(lp: torch.Tensor) -> TermInputs:
            token_lp = scatter_rows(lp, rows, noised.x0.shape)
            chunk_lp = chunk_logprobs(token_lp, noised.chunk_ids, num_chunks) if CHUNKS in self.needs else None
            return dataclasses.replace(x, student_token_logprobs=token_lp, student_chunk_logprobs=chunk_lp)

        def logprob_loss(lp: torch.Tensor) -> torch.Tensor:
            xl = with_logprobs(lp)
            return sum(term.weight * term.fn(xl) for term in by_logprob)

        kl_terms = {term.name: term.fn(x) for term in whole}
        head = dict(weight=self.student.output_weight, bias=self.student.output_bias, impl=self.kernels)
        h = hidden[rows]
        values, total = {}, None
        # The first whole-distribution term rides on the log-prob pass; any further one (a custom
        # `terms:` mix) costs a pass of its own.
        for i, term in enumerate(whole or [None]):
            n = None if term is None else term.name
            spec = None if n is None else dataclasses.replace(kl_terms[n], coef=term.weight * kl_terms[n].coef)
            first = i == 0 and bool(by_logprob)
            loss, lp, kl_vals = kernels.fused_head_loss(
                h,
                targets=noised.x0[rows] if first else None,
                logprob_loss=logprob_loss if first else None,
                groups=groups,
                num_groups=noised.x0.shape[0] * num_chunks,
                kl=spec,
                **head,
            )
            total = loss if total is None else total + loss
            if n is not None:
                values[n] = (kl_terms[n].coef * kl_vals).sum()
            if first:
                with torch.no_grad():
                    xl = with_logprobs(lp)
                    values.update({m.name: m.fn(xl) for m in by_logprob})
        return total, {term.name: values[term.name].detach() for term in self.terms.terms}

    def row_logprobs(self, r: Rows, targets: torch.Tensor, rows) -> torch.Tensor:
        """Target log-probs at `rows` (tiled over the vocabulary), scattered into [b, l] (0 elsewhere)."""
        lp, _ = kernels.target_logprobs(r.hidden, r.weight, targets[rows], bias=r.bias, impl=self.kernels)
        return scatter_rows(lp, rows, targets.shape)


def scatter_rows(values: torch.Tensor, rows, shape) -> torch.Tensor:
    """Per-row values [n] at `rows` (a nonzero tuple) in a zero tensor of `shape`."""
    return values.new_zeros(shape).index_put(rows, values)


def teacher_rows(noised: Noised):
    """Teacher positions matching the student's masked rows, and which rows have one.

    Identity chunks (same tokenizer and template) give the same positions. Otherwise a masked
    student token is paired with the teacher token of its chunk when that chunk is one token on
    both sides (the same id under two chat templates); other rows are left out of KL / TIDAL."""
    rows = noised.masked_rows
    if not noised.has_teacher_ids:
        return rows, None
    b, lt = noised.teacher_chunk_ids.shape
    num_chunks = noised.chunk_mask.shape[1]
    t_bucket, s_bucket = noised.teacher_chunk_ids + 1, noised.chunk_ids + 1  # -1 -> bucket 0
    pos = torch.arange(lt, device=t_bucket.device).expand(b, lt)
    t_pos = torch.zeros(b, num_chunks + 1, dtype=torch.long, device=pos.device).scatter_(1, t_bucket, pos)
    t_len = torch.zeros_like(t_pos).scatter_add_(1, t_bucket, torch.ones_like(pos))
    s_len = torch.zeros_like(t_pos).scatter_add_(1, s_bucket, torch.ones_like(s_bucket))
    chunk = s_bucket[rows]
    valid = (chunk > 0) & (t_len[rows[0], chunk] == 1) & (s_len[rows[0], chunk] == 1)
    return (rows[0], t_pos[rows[0], chunk]), valid
