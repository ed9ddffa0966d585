"""DeepSpeed set-up: process group, the student's ZeRO engine, teacher placement.

`build_engine(cfg, step)` is the one entry point the loop uses; each concern is a small function.
"""
from tide_ds.engine.build import Engine, build_engine
from tide_ds.engine.dist import Dist, init_distributed, wants_deepspeed
from tide_ds.engine.merge import merge_ds_config

__all__ = ["Dist", "Engine", "build_engine", "init_distributed", "merge_ds_config", "wants_deepspeed"]
