"""The distillation step (noise -> teacher -> student loss) and its schedulers."""
from tide_ds.pipeline.schedule import SCHEDULERS, Overlap, Sequential, build_scheduler
from tide_ds.pipeline.step import DistillStep, Noised, TeacherTargets

__all__ = ["DistillStep", "Noised", "Overlap", "SCHEDULERS", "Sequential", "TeacherTargets", "build_scheduler"]
