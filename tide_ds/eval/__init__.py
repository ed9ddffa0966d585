"""Evaluation of students: held-out NLL (loss), chunk agreement with the teacher (agreement),
HumanEval in a sandbox (humaneval, sandbox), lm-evaluation-harness (lm_eval_adapter), and the
`tide-ds eval` command (cli)."""

from tide_ds.eval.loss import masked_nll, masked_token_loss

__all__ = ["masked_nll", "masked_token_loss"]
