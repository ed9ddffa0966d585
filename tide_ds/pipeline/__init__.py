"""The distillation step (noise -> teacher -> student loss) and the run's resolved loss terms."""
from tide_ds.pipeline.step import DistillStep, Noised, TeacherTargets
from tide_ds.pipeline.terms import RunTerms, Term, TermInputs, resolve_terms

__all__ = ["DistillStep", "Noised", "RunTerms", "TeacherTargets", "Term", "TermInputs", "resolve_terms"]
