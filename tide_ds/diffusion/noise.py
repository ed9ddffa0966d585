"""Linear-schedule masked diffusion: one t per sequence, prompt never masked, chunk-consistent masking.

alpha(t) = 1 - t, so each maskable token is masked independently with probability t, and the
ELBO weight is w(t) = -alpha'(t) / (1 - alpha(t)) = 1 / t.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch


class RowStreams:
    """Random numbers per row, a pure function of each row's key: the k-th draw of a row comes from
    a generator seeded by (key, k). A row's values thus depend neither on the other rows of its
    batch nor on how wide the batch is padded (CPU `torch.rand` fills elements in order, so a wider
    draw begins with the narrower one). Pass it wherever a function takes `generator`."""

    def __init__(self, keys: Sequence[int]):
        self.keys = list(keys)
        self.draws = 0

    def rand(self, shape, device=None) -> torch.Tensor:
        if shape[0] != len(self.keys):
            raise ValueError(f"RowStreams has {len(self.keys)} rows, asked for a draw of shape {tuple(shape)}")
        k, self.draws = self.draws, self.draws + 1
        rows = []
        for key in self.keys:
            g = torch.Generator().manual_seed(mix_seed(key, k))
            rows.append(torch.rand(tuple(shape[1:]), generator=g))  # host: a CPU generator's numbers, then moved
        return torch.stack(rows).to(device)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def uniform(shape, generator: torch.Generator | RowStreams | None = None, device=None) -> torch.Tensor:
    """U[0, 1) of `shape`, from a torch generator or per-row streams."""
    if isinstance(generator, RowStreams):
        return generator.rand(shape, device)
    return torch.rand(shape, generator=generator, device=device)


def sample_t(
    batch: int, eps: float = 1e-3, generator: torch.Generator | RowStreams | None = None, device=None
) -> torch.Tensor:
    """t ~ U[eps, 1), one per sequence, fp32 [batch]."""
    u = uniform((batch,), generator, device)
    return eps + (1.0 - eps) * u


def mask_probability(t: torch.Tensor) -> torch.Tensor:
    """1 - alpha(t) for the linear schedule."""
    return t


def loss_weight(t: torch.Tensor) -> torch.Tensor:
    """w(t) = -alpha'(t) / (1 - alpha(t)) = 1 / t."""
    return 1.0 / t


def chunk_consistent_mask(masked: torch.Tensor, chunk_ids: torch.Tensor) -> torch.Tensor:
    """Closes whole chunks: a token in chunk c is masked if any token of c is masked.

    masked [b, l] bool, chunk_ids [b, l] long (-1 = no chunk; such tokens keep their own draw).
    """
    b, length = chunk_ids.shape
    bucket = (chunk_ids + 1).clamp_min(0)  # -1 -> bucket 0 (ignored)
    any_masked = torch.zeros(b, length + 1, dtype=torch.bool, device=masked.device)
    any_masked.scatter_reduce_(1, bucket, masked, reduce="amax")
    closed = any_masked.gather(1, bucket) & (chunk_ids >= 0)
    return masked | closed


def chunk_masked(token_masked: torch.Tensor, chunk_ids: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """[b, num_chunks] bool: chunk c holds a masked token (after chunk-consistent masking: all of them)."""
    b = chunk_ids.shape[0]
    out = torch.zeros(b, num_chunks + 1, dtype=torch.bool, device=token_masked.device)
    out.scatter_reduce_(1, (chunk_ids + 1).clamp_min(0), token_masked, reduce="amax")
    return out[:, 1:]


def tokens_of_chunks(chunk_flags: torch.Tensor, chunk_ids: torch.Tensor) -> torch.Tensor:
    """Maps a [b, C] chunk flag onto tokens through chunk_ids [b, l] (-1 -> False)."""
    padded = torch.cat([chunk_flags.new_zeros(chunk_flags.shape[0], 1), chunk_flags], dim=1)
    return padded.gather(1, (chunk_ids + 1).clamp_min(0))


@dataclass
class NoisedBatch:
    x_t: torch.Tensor  # [b, l] noised ids
    masked: torch.Tensor  # [b, l] bool, the masked set M
    t: torch.Tensor  # [b] fp32


def noise_batch(
    x0: torch.Tensor,
    maskable: torch.Tensor,
    mask_id: int,
    *,
    t: torch.Tensor | None = None,
    eps: float = 1e-3,
    chunk_ids: torch.Tensor | None = None,
    generator: torch.Generator | RowStreams | None = None,
) -> NoisedBatch:
    """Masks each maskable token with probability t (one t per row). With chunk_ids, whole chunks.

    maskable [b, l] bool is False on prompt tokens: they are never masked.
    """
    b = x0.shape[0]
    if t is None:
        t = sample_t(b, eps, generator=generator, device=x0.device)
    u = uniform(x0.shape, generator, x0.device)
    masked = (u < mask_probability(t)[:, None]) & maskable
    if chunk_ids is not None:
        masked = chunk_consistent_mask(masked, chunk_ids) & maskable
    x_t = torch.where(masked, torch.full_like(x0, mask_id), x0)
    return NoisedBatch(x_t=x_t, masked=masked, t=t)
