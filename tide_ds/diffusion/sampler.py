"""Block-diffusion sampling for a BD3LM student.

The answer is decoded block by block (blocks counted from position 0, as in training; with
align_prompt, as in the paper's evaluation, the prompt is left-padded to a whole number of blocks so
the answer starts on a block boundary; the padding is hidden from attention and the positions
count real tokens only). A block
starts with its unknown positions masked; each step runs the block against the cached keys and
values of the clean context (the prompt and every finished block) and fills the most confident
masked positions; temperature 0 picks the argmax token. A finished block is run once more as
clean context and appended to the cache, so no position is ever encoded twice as context.
The prompt is never changed: its tokens are never masked, so never selected.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from tide_ds.config import ConfigError
from tide_ds.diffusion.layout import clean_prefix


def unmask_schedule(masked: int, steps: int) -> list[int]:
    """How many positions each step fills: `masked` spread as evenly as possible over `steps`
    (earlier steps take the remainder), steps that would fill nothing dropped."""
    base, extra = divmod(masked, steps)
    return [n for n in (base + (i < extra) for i in range(steps)) if n > 0]


def check_length(prompt_len: int, max_new_tokens: int, limit: int) -> None:
    if prompt_len < 1:
        raise ConfigError("the prompt is empty; give at least one token")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt_len + max_new_tokens > limit:
        raise ConfigError(
            f"the prompt is {prompt_len} tokens and {max_new_tokens} new tokens were asked for: "
            f"{prompt_len + max_new_tokens} > the model's limit of {limit} positions (max_position_embeddings); "
            f"shorten the prompt or ask for at most {max(limit - prompt_len, 0)} new tokens"
        )


@torch.no_grad()
def generate(
    student,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    steps_per_block: int | None = None,
    temperature: float = 0.0,
    block_size: int | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    align_prompt: bool = False,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """Samples `max_new_tokens` after `prompt_ids` [b, P] (one length for the batch) with a
    `BD3LMStudent`. Returns [b, P + max_new_tokens] ids with no mask token left.

    steps_per_block defaults to the block size (one token per step). With eos_token_id, decoding
    stops after the first block in which every row has produced EOS; the rest is filled with EOS.
    align_prompt: left-pad the prompt with pad_token_id (hidden keys) to a multiple of the block size."""
    block = block_size or student.block_size
    steps = block if steps_per_block is None else steps_per_block
    if steps < 1:
        raise ConfigError(f"steps_per_block must be >= 1, got {steps}")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids[None]
    b, prompt_len = prompt_ids.shape
    check_length(prompt_len, max_new_tokens, student.max_length)

    device = student.output_weight.device
    mask_id = student.mask_token_id
    pad = 0
    if align_prompt:
        if pad_token_id is None:
            raise ConfigError("align_prompt needs a pad token id (the tokenizer's pad or EOS token)")
        pad = -prompt_len % block
        left = torch.full((b, pad), pad_token_id, dtype=prompt_ids.dtype)  # host: joined on the host, then moved
        prompt_ids = torch.cat([left, prompt_ids.cpu()], 1)
        prompt_len += pad
    total = prompt_len + max_new_tokens
    x = torch.cat([prompt_ids.to(device), torch.full((b, max_new_tokens), mask_id, device=device)], dim=1)
    positions = (torch.arange(total, device=device) - pad).clamp_min(0).expand(b, total)
    real = None if not pad else (torch.arange(total, device=device) >= pad).expand(b, total)
    cache = DynamicCache(config=student.model.config)

    def extend(ids, pos, pattern=None):
        return student.extend(
            ids,
            pos,
            cache,
            pattern,
            key_padding=None if real is None else real[:, : cache.get_seq_length() + ids.shape[1]],
        )

    first = prompt_len // block  # the block the answer starts in (it may also hold prompt tokens)
    if first > 0:  # the prompt's whole blocks: clean context, block-causal among themselves
        end = first * block
        extend(x[:, :end], positions[:, :end], clean_prefix(end, block))

    for start in range(first * block, total, block):
        end = min(start + block, total)
        ids, pos = x[:, start:end], positions[:, start:end]
        for count in unmask_schedule(end - max(start, prompt_len), steps):
            hidden = extend(ids, pos)
            cache.crop(-(end - start))  # the noisy block is not context: drop its keys again
            ids.copy_(fill_most_confident(student, hidden, ids, count, temperature, generator))
        extend(ids, pos)  # the finished block becomes clean context
        # sync point: one check per block, only when stopping at EOS
        if eos_token_id is not None and (x[:, prompt_len:end] == eos_token_id).any(dim=1).all():
            x[:, end:] = eos_token_id
            break
    return x[:, pad:]


def fill_most_confident(
    student, hidden: torch.Tensor, ids: torch.Tensor, count: int, temperature: float, generator: torch.Generator | None
) -> torch.Tensor:
    """`ids` with its `count` most confident masked positions filled (per row).

    Confidence is the probability of the chosen token: the argmax at temperature 0, else a
    sample from softmax(logits / temperature). The mask token itself is never chosen."""
    logits = hidden @ student.output_weight.T
    if student.output_bias is not None:
        logits = logits + student.output_bias
    logits = logits.float()
    logits[..., student.mask_token_id] = float("-inf")
    if temperature == 0:
        probs = logits.softmax(-1)
        choice = probs.argmax(-1)
    else:
        probs = (logits / temperature).softmax(-1)
        choice = torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(probs.shape[:-1])
    confidence = probs.gather(-1, choice[..., None]).squeeze(-1)
    masked = ids == student.mask_token_id
    confidence = confidence.masked_fill(~masked, -1.0)  # below any probability: never picked
    picked = confidence.topk(count, dim=-1).indices
    return ids.scatter(1, picked, choice.gather(1, picked))
