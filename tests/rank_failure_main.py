"""Entry used by tests/test_engine.py: the distillation CLI with a loss that raises on rank 1."""

import sys

import torch

from tide_ds import cli
from tide_ds.pipeline import step as step_module

_loss = step_module.DistillStep.loss


def failing_loss(self, *args, **kwargs):
    if torch.distributed.get_rank() == 1:
        raise RuntimeError("injected failure on this rank")
    return _loss(self, *args, **kwargs)


step_module.DistillStep.loss = failing_loss
sys.exit(cli.main())
