"""Entry used by tests/test_schedule.py: the distillation CLI with a teacher call that raises on
rank 1 (at its fifth call: with train.scheduler=overlap, on the worker thread, under the student's work)."""

import sys

import torch

from tide_ds import cli
from tide_ds.pipeline import step as step_module

_teacher_targets = step_module.DistillStep.teacher_targets
_calls = []


def failing_teacher_targets(self, noised):
    _calls.append(1)
    if torch.distributed.get_rank() == 1 and len(_calls) == 5:
        raise RuntimeError("injected teacher failure on this rank")
    return _teacher_targets(self, noised)


step_module.DistillStep.teacher_targets = failing_teacher_targets
sys.exit(cli.main())
