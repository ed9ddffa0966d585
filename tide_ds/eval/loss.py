"""Held-out masked-token loss: mean -log p(x0_i) over masked positions, at fixed noise draws.

`masked_token_loss` draws t per sequence (the training distribution); `masked_nll` fixes the
masking ratio, so a table can show how the loss grows as more of the sequence is hidden.
"""

from __future__ import annotations

import torch

from tide_ds.diffusion import noise_batch
from tide_ds.objectives import token_logprobs


@torch.no_grad()
def masked_token_loss(
    student, batches: list[dict], *, eps: float = 1e-3, seed: int = 1234, ratio: float | None = None
) -> float:
    """The same noise (t and masks, from `seed`) every call, so before/after numbers compare.

    ratio=None draws t ~ U[eps, 1) per sequence; a number masks every maskable token with that
    probability. Chunk ids in a batch (prepared data) close whole chunks, as in training."""
    was_training = student.training
    student.eval()
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    device = student.output_weight.device
    for batch in batches:
        x0, maskable = batch["input_ids"], batch["maskable"]
        t = None if ratio is None else torch.full((x0.shape[0],), float(ratio))  # host: noise is drawn on the host
        n = noise_batch(
            x0, maskable, student.mask_token_id, t=t, eps=eps, chunk_ids=batch.get("chunk_ids"), generator=gen
        )
        x0, x_t, masked = x0.to(device), n.x_t.to(device), n.masked.to(device)
        # Only the masked rows are projected, through the head module (so ZeRO-3 gathers it).
        logits = student.model.get_output_embeddings()(student.hidden_states(x_t, x0)[masked])
        lp = token_logprobs(logits, x0[masked])
        total += -lp.sum().item()  # sync point: evaluation only
        count += int(masked.sum())
    student.train(was_training)
    return total / max(count, 1)


def masked_nll(student, batches: list[dict], ratios: list[float], *, seed: int = 1234) -> dict[str, float]:
    """{ratio: held-out NLL per masked token} at each masking ratio, each from the same seed."""
    return {f"{r:g}": masked_token_loss(student, batches, seed=seed, ratio=r) for r in ratios}
