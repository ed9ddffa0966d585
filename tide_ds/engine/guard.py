"""The once-per-optimizer-step check: a stop signal, and non-finite losses or gradients.

Both are read in ONE small all-reduce per optimizer step (never per micro-batch), so every rank
takes the same decision at the same step: stop to save a checkpoint (pre-emption), skip the step,
or stop with an error naming the step and the terms that went non-finite (`train.nonfinite`).
"""

from __future__ import annotations

import torch

from tide_ds.config import Config, ConfigError


class NonFiniteError(ConfigError):
    """Training produced a non-finite loss or gradient; the message names the step, the terms and the fix."""


class StepGuard:
    def __init__(self, cfg: Config, engine, signals, log=print):
        self.cfg, self.engine, self.signals, self.log = cfg, engine, signals, log
        self.skipped = 0  # optimizer steps skipped in all
        self.in_a_row = 0

    def after_step(self, step: int, terms: dict[str, torch.Tensor]) -> int:
        """After optimizer step `step` (0-based) with its detached mean term values: the number of the
        signal that asks every rank to stop (0: go on). Raises NonFiniteError per train.nonfinite."""
        finite = self.engine.step_finite()
        device = finite.device
        bad = [~finite, *(~torch.isfinite(v.to(device)) for v in terms.values())]
        flags = torch.cat([torch.stack(bad).float(), torch.tensor([float(self.signals.signum)], device=device)])
        if self.engine.dist.world > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        values = flags.tolist()  # sync point: once per optimizer step (stop signal and numerics)
        bad_terms = [name for name, v in zip(terms, values[1:-1]) if v]
        if values[0] or bad_terms:
            self._non_finite(step, bad_terms)
        else:
            self.in_a_row = 0
        return int(values[-1])

    def _non_finite(self, step: int, bad_terms: list[str]) -> None:
        t = self.cfg.train
        what = f"non-finite {', '.join(bad_terms) if bad_terms else 'gradient norm'}"
        self.skipped += 1
        self.in_a_row += 1
        if t.nonfinite == "stop":
            raise NonFiniteError(
                f"step {step + 1}: {what} (train.nonfinite=stop); no weights of this step were "
                f"saved; lower train.lr (now {t.lr:g}), or resume from the last checkpoint with "
                f"train.nonfinite=skip"
            )
        if self.in_a_row > t.max_nonfinite:
            raise NonFiniteError(
                f"step {step + 1}: {what} for {self.in_a_row} optimizer steps in a row (more than "
                f"train.max_nonfinite={t.max_nonfinite}); no non-finite weights were saved; "
                f"lower train.lr (now {t.lr:g})"
            )
        self.log(f"step {step + 1}: {what}; optimizer step skipped ({self.skipped} skipped, {self.in_a_row} in a row)")
