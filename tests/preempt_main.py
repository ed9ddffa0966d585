"""Entry used by tests/test_faults.py: the distillation CLI, with a signal sent to one rank in the
middle of a chosen optimizer step, as a cluster scheduler would (TIDE_TEST_SIGNAL=NAME@STEP@RANK)."""

import os
import signal
import sys
import time

import torch

from tide_ds import cli
from tide_ds.pipeline import step as step_module

NAME, AT, RANK = os.environ["TIDE_TEST_SIGNAL"].split("@")
_loss = step_module.DistillStep.loss
calls = 0


def loss_then_signal(self, *args, **kwargs):
    global calls
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == int(RANK) and calls == int(AT):  # one micro-batch per step in these tests
        print(f"rank {rank} gets {NAME} at {time.time():.1f}", flush=True)
        os.kill(os.getpid(), getattr(signal, NAME))
    calls += 1
    return _loss(self, *args, **kwargs)


step_module.DistillStep.loss = loss_then_signal
sys.exit(cli.main())
