"""Stage 2: pretrain the LLaDA2-style MoE teacher as a masked diffusion LM, with tokenizer A.

The objective is the student's CE term (`bd3lm_ce`): one t ~ U[eps, 1) per window, every token
masked with probability t, -log p(x0) at the masked positions weighted by 1/t, over the whole
window (the teacher is bidirectional: one block). Windows are the training files' teacher tokens,
EOS-joined; held-out files are never read here.

The first `ar_steps` steps train the same weights as a causal next-token LM (as LLaDA2 itself starts
from an autoregressive model). Trained from scratch as a masked diffusion LM, the model sat at the
unigram loss for the whole default run at every masking ratio: a masked position holds no token of
its own, so nothing is learnt until attention has learnt to find the neighbours, and the gradient
towards that is diluted over the whole window. Next-token training learns those attention patterns
within tens of steps (the current token is in the residual stream); the diffusion phase then uses them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tide_ds.data.corpus import TextWindows
from tide_ds.diffusion import noise_batch
from tide_ds.mainjob.config import TeacherSetup
from tide_ds.models import LLaDA2MoeConfig, LLaDA2MoeModelLM, load_tokenizer
from tide_ds.objectives import bd3lm_ce, token_logprobs


def lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(setup: TeacherSetup, tokenizer_dir: str, train_files: list[Path], out: str, seed: int) -> dict:
    """Trains the teacher, saves it with its tokenizer to `out`, returns {"history": [...]}."""
    t = setup.train
    tokenizer = load_tokenizer(tokenizer_dir, "teacher tokenizer")
    windows = TextWindows(train_files, tokenizer, t.seq_len).windows
    torch.manual_seed(seed)
    config = LLaDA2MoeConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        mask_token_id=tokenizer.mask_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_position_embeddings=max(512, t.seq_len),
        **setup.model,
    )
    model = LLaDA2MoeModelLM(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"teacher: LLaDA2-style MoE, {n_params / 1e6:.2f}M params ({config.num_experts} experts, top-"
        f"{config.num_experts_per_tok}), {len(windows)} windows of {t.seq_len} tokens"
    )
    history = []
    per_step = t.batch_size * t.seq_len
    bar = tqdm(total=t.steps * per_step, desc="pretrain teacher", unit="tok", unit_scale=True, mininterval=2.0)
    order = torch.randperm(len(windows), generator=gen)
    causal = torch.ones(t.seq_len, t.seq_len, dtype=torch.bool).tril()[None, None]  # True = may attend
    for step in range(t.steps):
        lo = (step * t.batch_size) % max(1, len(windows) - t.batch_size)
        x0 = windows[order[lo : lo + t.batch_size]]
        maskable = torch.ones_like(x0, dtype=torch.bool)
        n = noise_batch(x0, maskable, config.mask_token_id, generator=gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, t.steps, t.lr, t.warmup_steps, t.min_lr_ratio)
        if step < t.ar_steps:  # the noise is drawn anyway, so the diffusion phase's draws do not depend on ar_steps
            logits = model(x0[:, :-1], attention_mask=causal[:, :, :-1, :-1]).logits
            loss = F.cross_entropy(logits.flatten(0, 1), x0[:, 1:].flatten())
        else:
            logits = model(n.x_t).logits
            loss = bd3lm_ce(token_logprobs(logits, x0), n.masked, maskable, n.t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.update(per_step)
        if step % t.log_every == 0 or step == t.steps - 1:
            history.append(
                {"step": step, "loss": loss.item(), "phase": "ar" if step < t.ar_steps else "diffusion"}
            )  # sync point: logging only
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", refresh=False)
    bar.close()
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    with open(os.path.join(out, "pretrain_history.json"), "w") as f:
        json.dump(history, f)
    return {"history": history, "params": n_params}
