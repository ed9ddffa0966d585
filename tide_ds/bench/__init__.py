"""`tide-ds bench NAME`: benchmarks that print speed and memory figures."""

import importlib

BENCHMARKS = {
    "kernel": "tide_ds.bench.kernel",
    "teacher": "tide_ds.bench.teacher",
    "align": "tide_ds.bench.align",
    "step": "tide_ds.bench.step",
    "schedule": "tide_ds.bench.schedule",
    "targets": "tide_ds.bench.targets",
    "placement": "tide_ds.bench.memory",
}


def add_arguments(parser):
    sub = parser.add_subparsers(dest="bench", required=True, metavar="NAME")
    for name, module in BENCHMARKS.items():
        importlib.import_module(module).add_arguments(sub.add_parser(name))


def run(args):
    return importlib.import_module(BENCHMARKS[args.bench]).run(args)
