"""Block-diffusion sampling: fills every mask, keeps the prompt, reuses cached context correctly."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from tiny import STUDENT_INIT, decoder, word_tokenizer

from tide_ds.config import ConfigError, ModelConfig
from tide_ds.diffusion.sampler import fill_most_confident, generate, unmask_schedule
from tide_ds.models import BD3LMStudent, build_student
from tide_ds.pipeline import DistillStep, resolve_terms

MASK = 63


def student(block=4, **kw):
    return BD3LMStudent(decoder(max_position_embeddings=64, **kw), block_size=block, mask_token_id=MASK).eval()


def test_unmask_schedule():
    assert unmask_schedule(8, 4) == [2, 2, 2, 2]
    assert unmask_schedule(7, 3) == [3, 2, 2]
    assert unmask_schedule(2, 4) == [1, 1]
    for masked, steps in itertools.product(range(1, 12), range(1, 6)):
        assert sum(unmask_schedule(masked, steps)) == masked


@pytest.mark.parametrize("prompt_len,new,steps", [(5, 11, 2), (8, 8, 4), (1, 3, 1), (7, 9, 4)])
def test_fills_every_mask_and_keeps_the_prompt(prompt_len, new, steps):
    s = student()
    prompt = torch.randint(0, 60, (3, prompt_len))
    out = generate(s, prompt, new, steps_per_block=steps)
    assert out.shape == (3, prompt_len + new)
    assert torch.equal(out[:, :prompt_len], prompt)
    assert not (out == MASK).any()
    assert torch.equal(generate(s, prompt, new, steps_per_block=steps), out)  # temperature 0: deterministic


def test_sampling_with_temperature_is_seeded():
    s = student()
    prompt = torch.randint(0, 60, (2, 6))

    def run(seed):
        return generate(s, prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not (run(1) == MASK).any()


def reference_generate(s, prompt, new, steps):
    """The same decoding without a cache: every step recomputes the [x_t ; x_0] layout of training."""
    b, p = prompt.shape
    x = torch.cat([prompt, torch.full((b, new), MASK)], 1)
    total, block = p + new, s.block_size
    for start in range(p // block * block, total, block):
        end = min(start + block, total)
        for count in unmask_schedule(end - max(start, p), steps):
            x_t = x.clone()
            x_t[:, end:] = MASK  # later blocks are unknown (never read by this block anyway)
            hidden = s.hidden_states(x_t, x)[:, start:end]
            x[:, start:end] = fill_most_confident(s, hidden, x[:, start:end], count, 0.0, None)
    return x


@pytest.mark.parametrize("prompt_len", [6, 8])
def test_cached_context_equals_recomputing_the_training_layout(prompt_len):
    s = student()
    prompt = torch.randint(0, 60, (2, prompt_len))
    with torch.no_grad():
        assert torch.equal(generate(s, prompt, 13, steps_per_block=2), reference_generate(s, prompt, 13, 2))


def test_stops_at_eos_and_fills_the_rest():
    s = student()
    with torch.no_grad():
        s.model.lm_head.bias = torch.nn.Parameter(torch.full((64,), -100.0))
        s.model.lm_head.bias.data[0] = 100.0  # EOS (id 0) everywhere
    out = generate(s, torch.randint(1, 60, (2, 5)), 20, eos_token_id=0)
    assert (out[:, 5:] == 0).all()


def test_prompt_longer_than_the_model_limit_is_a_clear_error():
    s = student()  # max_position_embeddings = 64
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        generate(s, torch.randint(0, 60, (1, 60)), 8)
    with pytest.raises(ConfigError, match="steps_per_block"):
        generate(s, torch.randint(0, 60, (1, 4)), 8, steps_per_block=0)


@contextlib.contextmanager
def one_thread():
    """Tiny models train far faster on one thread than on two contended ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def test_student_trained_on_a_repetitive_pattern_reproduces_it():
    """CE-only BD3LM training (the distillation step, no teacher) on a cycle of six letters; a few
    seconds on one CPU thread. Sampling then continues the cycle from any phase."""
    torch.manual_seed(0)
    tokenizer = word_tokenizer()
    cfg = ModelConfig(init=dict(STUDENT_INIT, max_position_embeddings=64))
    s = build_student(cfg, tokenizer, block_size=4, mask_token="<|mask|>")
    cycle = torch.tensor(tokenizer("a b c d e f", add_special_tokens=False)["input_ids"])
    step = DistillStep(s, None, resolve_terms("ce"))
    opt = torch.optim.AdamW(s.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(0)
    with one_thread():
        for _ in range(150):
            x0 = cycle[(torch.randint(0, 6, (8, 1), generator=gen) + torch.arange(24)) % 6]
            noised = step.noise({"input_ids": x0, "maskable": torch.ones_like(x0, dtype=torch.bool)}, generator=gen)
            loss, _ = step.loss(noised, step.teacher_targets(noised), progress=0.0)
            loss.backward()
            opt.step()
            opt.zero_grad()
        s.eval()
        for prompt, want in [
            ("c d e f a", "c d e f a b c d e f a b c d e f a b c d"),
            ("e f a b c d e", "e f a b c d e f a b c d e f a b c d e f a b"),
        ]:
            ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
            assert tokenizer.decode(generate(s, ids, 15, steps_per_block=2)[0]) == want


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_flex_generates_like_sdpa_on_cuda():
    prompt = torch.randint(0, 60, (2, 7), device="cuda")
    outs = [
        generate(
            BD3LMStudent(decoder(max_position_embeddings=64).cuda(), 4, MASK, attn_backend=backend),
            prompt,
            13,
            steps_per_block=2,
        )
        for backend in ("sdpa", "flex")
    ]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.gpu
@needs_cuda
def test_flash_sampler_step_equals_sdpa_on_cuda():
    pytest.importorskip("flash_attn")
    from transformers import DynamicCache

    model = decoder(max_position_embeddings=64).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 60, (2, 12), device="cuda")
    pos = torch.arange(12, device="cuda").expand(2, 12)
    hidden = []
    for backend in ("sdpa", "flash"):
        s = BD3LMStudent(model, 4, MASK, attn_backend=backend)
        cache = DynamicCache(config=model.config)
        s.extend(ids[:, :8], pos[:, :8], cache)  # clean context, all visible (as after a block-causal prefill)
        hidden.append(s.extend(ids[:, 8:], pos[:, 8:], cache).float())
    torch.testing.assert_close(hidden[1], hidden[0], atol=3e-2, rtol=3e-2)


def reference_aligned(s, prompt, new, steps, pad_id):
    """Left-padded decoding without a cache: every step recomputes [0, end) block-causally with the
    padding keys hidden and positions counting real tokens (the paper's evaluation layout)."""
    from tide_ds.diffusion.layout import clean_prefix
    from tide_ds.models.attention import run_decoder

    b, p = prompt.shape
    block = s.block_size
    pad = -p % block
    x = torch.cat([torch.full((b, pad), pad_id), prompt, torch.full((b, new), MASK)], 1)
    total = x.shape[1]
    real = (torch.arange(total) >= pad).expand(b, total)
    pos = (torch.arange(total) - pad).clamp_min(0).expand(b, total)
    assert (p + pad) % block == 0  # the first answer token starts a block
    for start in range(p + pad, total, block):
        end = min(start + block, total)
        for count in unmask_schedule(end - start, steps):
            hidden = run_decoder(
                s.model, "sdpa", x[:, :end], pos[:, :end], clean_prefix(end, block), key_padding=real[:, :end]
            )[:, start:end]
            x[:, start:end] = fill_most_confident(s, hidden, x[:, start:end], count, 0.0, None)
    return x[:, pad:]


@pytest.mark.parametrize("prompt_len", [5, 6, 8])
def test_aligned_prompt_puts_the_answer_on_a_block_boundary(prompt_len):
    """align_prompt: the answer's first token starts a block; the padding is invisible (any pad id
    gives the same answer) and the cached sampler equals the recomputing reference."""
    s = student()
    prompt = torch.randint(1, 60, (2, prompt_len))
    with torch.no_grad():
        out = generate(s, prompt, 10, steps_per_block=2, align_prompt=True, pad_token_id=0)
        assert out.shape == (2, prompt_len + 10) and torch.equal(out[:, :prompt_len], prompt)
        assert torch.equal(out, reference_aligned(s, prompt, 10, 2, pad_id=0))
        assert torch.equal(out, generate(s, prompt, 10, steps_per_block=2, align_prompt=True, pad_token_id=7))
        if prompt_len % 4 == 0:  # nothing to pad: the plain sampler's answer
            assert torch.equal(out, generate(s, prompt, 10, steps_per_block=2))
    with pytest.raises(ConfigError, match="pad token"):
        generate(s, prompt, 4, align_prompt=True)
