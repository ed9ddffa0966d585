"""Entry used by tests/test_inputs.py: the distillation CLI, where rank 1 sees the checkpoints
directory as a node with a stale view of a shared filesystem would (its newest step<N> missing),
and every rank prints the checkpoint it resumes."""

import sys

import torch

from tide_ds import checkpoint, cli

_steps, _load = checkpoint._steps, checkpoint.load


def stale_steps(root):
    found = _steps(root)
    return found[1:] if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1 else found


def load_and_say(engine, root, tag):
    print(f"rank {engine.dist.rank} resumes {tag}", flush=True)
    return _load(engine, root, tag)


checkpoint._steps = stale_steps
checkpoint.load = load_and_say
sys.exit(cli.main())
