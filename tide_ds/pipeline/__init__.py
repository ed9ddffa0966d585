"""The distillation step (noise -> teacher -> student loss) and its schedulers."""
from tide_ds.pipeline.step import DistillStep, Noised, TeacherTargets

__all__ = ["DistillStep", "Noised", "TeacherTargets"]
