"""`tide-ds bench NAME`: benchmarks that print speed and memory figures."""

import importlib

from tide_ds.config import ConfigError

BENCHMARKS = {
    "kernel": "tide_ds.bench.kernel",
    "teacher": "tide_ds.bench.teacher",
    "align": "tide_ds.bench.align",
    "step": "tide_ds.bench.step",
    "schedule": "tide_ds.bench.schedule",
    "targets": "tide_ds.bench.targets",
    "placement": "tide_ds.bench.memory",
    "floor": "tide_ds.bench.floor",
}


def add_arguments(parser):
    sub = parser.add_subparsers(dest="bench", required=True, metavar="NAME")
    for name, module in BENCHMARKS.items():
        importlib.import_module(module).add_arguments(sub.add_parser(name))


# integer options that may be 0; every other one is a size or a count and must be >= 1
MAY_BE_ZERO = {"seed", "warmup"}


def check_sizes(args) -> None:
    """Every integer option in range, before any work (a size of 0 divides by zero or measures nothing)."""
    for name, value in vars(args).items():
        if type(value) is int and value < (0 if name in MAY_BE_ZERO else 1):
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} must be >= {0 if name in MAY_BE_ZERO else 1}, got {value}")


def run(args):
    check_sizes(args)
    return importlib.import_module(BENCHMARKS[args.bench]).run(args)
