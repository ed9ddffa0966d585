"""lm-evaluation-harness adapter: `lm_eval --model tide_ds --model_args pretrained=DIR ...`.

A BD3LM student has no left-to-right likelihood, so `loglikelihood` is the diffusion ELBO of the
continuation given the context: K masking ratios t_k = (k - 1/2) / K (stratified, so the estimate is
deterministic and low-variance), each masking every continuation token with probability t_k from a
seeded generator, and sum over masked tokens of log p(x_i) / t_k, averaged over k. `is_greedy` is
whether, with the whole continuation masked, the argmax at every position is the continuation.
`generate_until` runs the block-diffusion sampler greedily and cuts at the first stop string.
Importing this module registers the model name "tide_ds" (needs the lm_eval package:
pip install 'tide_ds[lmeval]').
"""

from __future__ import annotations

import torch

from tide_ds.config import ConfigError

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # one clear line, naming the extra
    raise ConfigError("the lm-evaluation-harness adapter needs lm_eval: pip install 'tide_ds[lmeval]'") from e

from tide_ds.diffusion.sampler import generate
from tide_ds.eval.cli import load_model
from tide_ds.objectives import token_logprobs


@torch.no_grad()
def continuation_elbo(
    student, context: list[int], continuation: list[int], *, samples: int = 8, seed: int = 1234, pad_id: int = 0
) -> tuple[float, bool]:
    """(ELBO of log p(continuation | context), greedy) for one request; see the module docstring."""
    ids = (context + continuation)[-student.max_length :]
    n_cont = min(len(continuation), len(ids))
    block = student.block_size
    length = -(-len(ids) // block) * block
    x0 = torch.full((1, length), pad_id, dtype=torch.long)
    x0[0, : len(ids)] = torch.tensor(ids)
    cont = torch.zeros_like(x0, dtype=torch.bool)
    cont[0, len(ids) - n_cont : len(ids)] = True
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for k in range(samples):
        t = (k + 0.5) / samples
        masked = cont & (torch.rand(x0.shape, generator=gen) < t)
        if not masked.any():
            continue
        x_t = torch.where(masked, student.mask_token_id, x0)
        logits = student.model.get_output_embeddings()(student.hidden_states(x_t, x0)[masked])
        total += token_logprobs(logits, x0[masked]).sum().item() / t
    x_t = torch.where(cont, student.mask_token_id, x0)
    logits = student.model.get_output_embeddings()(student.hidden_states(x_t, x0)[cont])
    greedy = bool((logits.argmax(-1) == x0[cont]).all())
    return total / samples, greedy


@register_model("tide_ds")
class TideDSLM(LM):
    def __init__(
        self,
        pretrained: str,
        tokenizer: str | None = None,
        mc_samples: int = 8,
        steps_per_block: int = 8,
        seed: int = 1234,
        batch_size: int = 1,
        **kwargs,
    ):
        super().__init__()
        self.student, self.tokenizer = load_model(pretrained, tokenizer)
        self.mc_samples, self.steps_per_block, self.seed = int(mc_samples), int(steps_per_block), int(seed)
        self.pad_id = self.tokenizer.eos_token_id or 0

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args
            # Tokenize the joined text and split where the context ends, so a merge across the
            # boundary is not counted twice.
            whole = self._encode(context + continuation)
            n_ctx = len(self._encode(context)) if context else 0
            out.append(
                continuation_elbo(
                    self.student,
                    whole[:n_ctx],
                    whole[n_ctx:],
                    samples=self.mc_samples,
                    seed=self.seed,
                    pad_id=self.pad_id,
                )
            )
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for req in requests:
            ids = self._encode(req.args[0])
            out.append(
                continuation_elbo(
                    self.student, ids[:1], ids[1:], samples=self.mc_samples, seed=self.seed, pad_id=self.pad_id
                )[0]
            )
        return out

    def generate_until(self, requests) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            new = int(kwargs.get("max_gen_toks", 64))
            ids = self._encode(context)[-(self.student.max_length - new) :]
            tokens = generate(
                self.student,
                torch.tensor([ids]),
                new,
                steps_per_block=self.steps_per_block,
                eos_token_id=self.tokenizer.eos_token_id,
            )[0].tolist()
            head = self.tokenizer.decode(ids, skip_special_tokens=True)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)[len(head) :]
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out
