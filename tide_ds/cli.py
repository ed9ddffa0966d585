"""`tide-ds` command line. Each subcommand lives in its own module, imported only when used, and
exposes `add_arguments(parser)` and `run(args) -> int`."""

from __future__ import annotations

import argparse
import importlib
import sys

from tide_ds.config import ConfigError

SUBCOMMANDS = {
    "demo": ("tide_ds.demo", "the main job: MoE teacher, cross-tokenizer distillation with four recipes, evaluation"),
    "distill": ("tide_ds.train", "distill a teacher into a BD3LM student from a YAML config"),
    "teach": (
        "tide_ds.teach",
        "run the teacher once over a run and write its targets (distill teacher.targets=DIR)",
    ),
    "prepare": ("tide_ds.data.prepare", "tokenize and align a chat/text dataset offline"),
    "generate": ("tide_ds.generate", "generate with a BD3LM student"),
    "eval": ("tide_ds.eval.cli", "evaluate a student: held-out NLL, teacher agreement, samples, HumanEval"),
    "a2d": ("tide_ds.models.a2d", "convert an autoregressive checkpoint (Qwen3 / Llama) into a BD3LM student"),
    "export": ("tide_ds.checkpoint", "turn a training checkpoint into a transformers model directory"),
    "bench": ("tide_ds.bench", "benchmarks that print speed and memory figures"),
    "plan": ("tide_ds.engine.memory", "each rank's memory by part before launch, the verdict, the largest micro-batch"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tide-ds", description=__doc__.splitlines()[0])
    # The deepspeed launcher passes --local_rank=N to every rank (LOCAL_RANK in the environment too).
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    # Only the chosen subcommand's module is imported (torch and friends load lazily).
    chosen = next((a for a in argv if not a.startswith("-")), None)
    modules = {}
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            modules[name] = importlib.import_module(module)
            modules[name].add_arguments(p)
    args, extra = parser.parse_known_args(argv)
    # argparse takes a positional list only once: key=value overrides after an option (the
    # `--resume latest` that a pre-empted run prints, say) join the ones before it, in order.
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *(a for a in extra if "=" in a and not a.startswith("-"))]
        extra = [a for a in extra if a not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(modules[args.command].run(args) or 0)
    except ConfigError as e:
        print(f"tide-ds {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
