"""Chunk-level agreement between a student and its teacher on held-out cross-tokenizer data.

Chunks are the aligned token runs of `tide-ds prepare` (the same bytes on both sides). At a fixed
masking ratio, whole chunks are masked on both sides (as in training); for every masked chunk each
model's chunk log-prob (the sum of its tokens' log-probs) and whether its greedy prediction spells
the chunk (every token the argmax) are computed. Reported:
  chunk_agreement   fraction of masked chunks where student and teacher are both right or both wrong
  chunk_gap         mean |lS - lT| in nats, the distance Reverse CALM and CALM close
  chunk_corr        Pearson correlation of lS and lT over masked chunks (which chunks each finds hard)
  student_chunk_acc, teacher_chunk_acc   fraction of masked chunks each spells greedily
"""

from __future__ import annotations

import torch

from tide_ds.diffusion import chunk_masked, noise_batch, tokens_of_chunks
from tide_ds.objectives import chunk_logprobs, token_logprobs


def _chunk_scores(logits: torch.Tensor, targets: torch.Tensor, rows, chunk_ids: torch.Tensor, num_chunks: int):
    """Chunk log-probs and greedy misses [b, C] from logits at `rows` (a nonzero tuple)."""
    lp = torch.zeros(chunk_ids.shape, dtype=torch.float32)
    miss = torch.zeros(chunk_ids.shape, dtype=torch.float32)
    lp[rows] = token_logprobs(logits, targets).float()
    miss[rows] = (logits.argmax(-1) != targets).float()
    return chunk_logprobs(lp, chunk_ids, num_chunks), chunk_logprobs(miss, chunk_ids, num_chunks)


@torch.no_grad()
def chunk_agreement(student, teacher, batches: list[dict], *, ratio: float = 0.5, seed: int = 1234) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    sums = {"chunk_agreement": 0.0, "chunk_gap": 0.0, "student_chunk_acc": 0.0, "teacher_chunk_acc": 0.0}
    count = 0
    pairs = []
    for batch in batches:
        x0, maskable, chunk_ids = batch["input_ids"], batch["maskable"], batch["chunk_ids"]
        num_chunks = batch["num_chunks"]
        t = torch.full((x0.shape[0],), float(ratio))
        n = noise_batch(x0, maskable, student.mask_token_id, t=t, chunk_ids=chunk_ids, generator=gen)
        active = chunk_masked(n.masked, chunk_ids, num_chunks)

        rows = n.masked.nonzero(as_tuple=True)
        s_logits = student.model.get_output_embeddings()(student.hidden_states(n.x_t, x0)[rows])
        s_lp, s_miss = _chunk_scores(s_logits, x0[rows], rows, chunk_ids, num_chunks)

        t_x0, t_chunks = batch["teacher_input_ids"], batch["teacher_chunk_ids"]
        t_masked = tokens_of_chunks(active, t_chunks)
        t_in = torch.where(t_masked, teacher.mask_token_id, t_x0)
        t_rows = t_masked.nonzero(as_tuple=True)
        hidden = teacher.hidden_states(t_in, batch.get("teacher_attention_mask"), x0=t_x0)[t_rows]
        t_logits = hidden @ teacher.output_weight.T
        if teacher.output_bias is not None:
            t_logits = t_logits + teacher.output_bias
        t_lp, t_miss = _chunk_scores(t_logits, t_x0[t_rows], t_rows, t_chunks, num_chunks)

        s_ok, t_ok = s_miss[active] == 0, t_miss[active] == 0
        sums["chunk_agreement"] += (s_ok == t_ok).sum().item()
        sums["chunk_gap"] += (s_lp[active] - t_lp[active]).abs().sum().item()
        sums["student_chunk_acc"] += s_ok.sum().item()
        sums["teacher_chunk_acc"] += t_ok.sum().item()
        count += int(active.sum())
        pairs.append(torch.stack([s_lp[active], t_lp[active]]).double())
    out = {k: v / max(count, 1) for k, v in sums.items()} | {"chunks": count}
    both = torch.cat(pairs, dim=1) if pairs else torch.zeros(2, 0, dtype=torch.float64)
    out["chunk_corr"] = float(torch.corrcoef(both)[0, 1]) if both.shape[1] > 1 else float("nan")
    return out
