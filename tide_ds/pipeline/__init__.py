"""The distillation step (noise -> teacher -> student loss), its schedulers and the run's resolved loss terms."""

from tide_ds.pipeline.schedule import SCHEDULERS, Overlap, Sequential, build_scheduler, check_overlap
from tide_ds.pipeline.step import DistillStep, Noised, TeacherTargets
from tide_ds.pipeline.terms import RunTerms, Term, TermInputs, resolve_terms

__all__ = [
    "DistillStep",
    "Noised",
    "Overlap",
    "RunTerms",
    "SCHEDULERS",
    "Sequential",
    "TeacherTargets",
    "Term",
    "TermInputs",
    "build_scheduler",
    "check_overlap",
    "resolve_terms",
]
