"""Distributed execution: process group, the run plan, teacher placement, the student's engine.

`settle` (plan.py) fixes the run's batch, precision and optimizer values before any model is
built; `build_engine` (build.py) places the teacher by its placement's function (placement.py)
and wraps the student in a plain or a DeepSpeed engine.
"""

from tide_ds.engine.build import DeepSpeedEngine, Engine, PlainEngine, build_engine
from tide_ds.engine.dist import Dist, init_distributed, launched_world
from tide_ds.engine.plan import RunPlan, load_ds_config, settle

__all__ = [
    "DeepSpeedEngine",
    "Dist",
    "Engine",
    "PlainEngine",
    "RunPlan",
    "build_engine",
    "init_distributed",
    "launched_world",
    "load_ds_config",
    "settle",
]
