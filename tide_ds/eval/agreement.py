"""Same-chunk scores of a student and its teacher on held-out cross-tokenizer data.

Chunks are the aligned token runs of `tide-ds prepare` (the same bytes on both sides). At a fixed
masking ratio, whole chunks are masked on both sides (as in training); the draw depends only on the
batch, the ratio and the seed, never on the model, so every model is scored on the same masked
chunks. For every masked chunk each model's chunk log-prob (the sum of its tokens' log-probs) and
whether its greedy prediction spells the chunk (every token the argmax) are computed.

`chunk_losses` turns them into one measure across tokenizers: bits per byte of the masked chunks'
bytes, -sum(chunk log-prob) / ln 2 / sum(chunk bytes), next to the per-token NLL on the model's own
tokens of those chunks. `chunk_agreement` compares the two sides:
  chunk_agreement   fraction of masked chunks where student and teacher are both right or both wrong
  chunk_gap         mean |lS - lT| in nats, the distance Reverse CALM and CALM close
  chunk_corr        Pearson correlation of lS and lT over masked chunks (which chunks each finds hard)
  student_chunk_acc, teacher_chunk_acc   fraction of masked chunks each spells greedily
"""

from __future__ import annotations

import math

import torch

from tide_ds.diffusion import chunk_masked, noise_batch, tokens_of_chunks
from tide_ds.objectives import chunk_logprobs, token_logprobs


def masked_chunks(batch: dict, ratio: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One draw: (student tokens masked [b, l], chunks masked [b, C]). Mask id 0 is a placeholder:
    the draw does not depend on it."""
    x0 = batch["input_ids"]
    t = torch.full((x0.shape[0],), float(ratio), device=x0.device)
    n = noise_batch(x0, batch["maskable"], 0, t=t, chunk_ids=batch["chunk_ids"], generator=gen)
    return n.masked, chunk_masked(n.masked, batch["chunk_ids"], batch["num_chunks"])


def _chunk_scores(logits: torch.Tensor, targets: torch.Tensor, rows, chunk_ids: torch.Tensor, num_chunks: int):
    """Chunk log-probs and greedy misses [b, C] from logits at `rows` (a nonzero tuple)."""
    lp = torch.zeros(chunk_ids.shape, dtype=torch.float32, device=logits.device)
    miss = torch.zeros(chunk_ids.shape, dtype=torch.float32, device=logits.device)
    lp[rows] = token_logprobs(logits, targets).float()
    miss[rows] = (logits.argmax(-1) != targets).float()
    return chunk_logprobs(lp, chunk_ids, num_chunks), chunk_logprobs(miss, chunk_ids, num_chunks)


def student_chunks(student, batch: dict, masked: torch.Tensor, active: torch.Tensor):
    """The student's chunk log-probs and greedy misses [b, C] with the tokens `masked` hidden."""
    device = student.output_weight.device
    x0, masked = batch["input_ids"].to(device), masked.to(device)
    x_t = torch.where(masked, student.mask_token_id, x0)
    rows = masked.nonzero(as_tuple=True)
    # Only the masked rows are projected, through the head module (so ZeRO-3 gathers it).
    logits = student.model.get_output_embeddings()(student.hidden_states(x_t, x0)[rows])
    return _chunk_scores(logits, x0[rows], rows, batch["chunk_ids"].to(device), batch["num_chunks"])


def teacher_chunks(teacher, batch: dict, masked: torch.Tensor, active: torch.Tensor):
    """The teacher's chunk log-probs and greedy misses [b, C] with the tokens of the `active` chunks hidden."""
    device = teacher.output_weight.device
    t_x0, t_chunks = batch["teacher_input_ids"].to(device), batch["teacher_chunk_ids"].to(device)
    t_masked = tokens_of_chunks(active.to(device), t_chunks)
    t_in = torch.where(t_masked, teacher.mask_token_id, t_x0)
    rows = t_masked.nonzero(as_tuple=True)
    attention = batch.get("teacher_attention_mask")
    hidden = teacher.hidden_states(t_in, None if attention is None else attention.to(device), x0=t_x0)[rows]
    logits = hidden @ teacher.output_weight.T
    if teacher.output_bias is not None:
        logits = logits + teacher.output_bias
    return _chunk_scores(logits, t_x0[rows], rows, t_chunks, batch["num_chunks"])


def chunk_sizes(batch: dict, side: str, byte_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bytes [b, C], tokens of `side` [b, C]) of every chunk. Bytes are counted on the teacher's
    tokens (`byte_lengths[id]`: the length of each id's entry in its byte table): both sides spell a
    chunk's bytes, and a byte-level BPE spells them end to end, with no dummy-prefix space."""
    t_ids, t_chunks = batch["teacher_input_ids"], batch["teacher_chunk_ids"]
    n = batch["num_chunks"]
    nbytes = chunk_logprobs(byte_lengths.to(t_ids.device)[t_ids].float(), t_chunks, n)
    chunk_ids = t_chunks if side == "teacher" else batch["chunk_ids"]
    return nbytes, chunk_logprobs(torch.ones(chunk_ids.shape, device=chunk_ids.device), chunk_ids, n)


@torch.no_grad()
def chunk_losses(
    model, side: str, batches: list[dict], ratios: list[float], byte_lengths: torch.Tensor, *, seed: int = 1234
) -> dict[str, dict[str, float]]:
    """{ratio: {bpb, nll, chunks, bytes, tokens}} of one model (`side` "student" or "teacher") over
    the masked chunks of each ratio's draw (each ratio from the same seed, as `chunk_agreement`)."""
    score = student_chunks if side == "student" else teacher_chunks
    out = {}
    for r in ratios:
        gen = torch.Generator().manual_seed(seed)
        nats, nbytes, tokens, chunks = 0.0, 0.0, 0.0, 0
        for batch in batches:
            masked, active = masked_chunks(batch, r, gen)
            lp, _ = score(model, batch, masked, active)
            b, k = chunk_sizes(batch, side, byte_lengths)
            active = active.to(lp.device)
            nats -= lp[active].sum().item()  # sync point: evaluation only
            nbytes += b[active.to(b.device)].sum().item()
            tokens += k[active.to(k.device)].sum().item()
            chunks += int(active.sum())
        out[f"{r:g}"] = {
            "bpb": nats / math.log(2) / max(nbytes, 1.0),
            "nll": nats / max(tokens, 1.0),
            "chunks": chunks,
            "bytes": int(nbytes),
            "tokens": int(tokens),
        }
    return out


@torch.no_grad()
def chunk_agreement(student, teacher, batches: list[dict], *, ratio: float = 0.5, seed: int = 1234) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    sums = {"chunk_agreement": 0.0, "chunk_gap": 0.0, "student_chunk_acc": 0.0, "teacher_chunk_acc": 0.0}
    count = 0
    pairs = []
    for batch in batches:
        masked, active = masked_chunks(batch, ratio, gen)
        s_lp, s_miss = student_chunks(student, batch, masked, active)
        t_lp, t_miss = teacher_chunks(teacher, batch, masked, active)
        t_lp, t_miss, active = t_lp.to(s_lp.device), t_miss.to(s_lp.device), active.to(s_lp.device)
        s_ok, t_ok = s_miss[active] == 0, t_miss[active] == 0
        sums["chunk_agreement"] += (s_ok == t_ok).sum().item()
        sums["chunk_gap"] += (s_lp[active] - t_lp[active]).abs().sum().item()
        sums["student_chunk_acc"] += s_ok.sum().item()
        sums["teacher_chunk_acc"] += t_ok.sum().item()
        count += int(active.sum())
        pairs.append(torch.stack([s_lp[active], t_lp[active]]).double())
    out = {k: v / max(count, 1) for k, v in sums.items()} | {"chunks": count}
    both = torch.cat(pairs, dim=1) if pairs else torch.zeros(2, 0, dtype=torch.float64)  # host: summary only
    out["chunk_corr"] = float(torch.corrcoef(both)[0, 1]) if both.shape[1] > 1 else float("nan")
    return out
