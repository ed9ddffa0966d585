"""Entry used by tests/test_schedule.py: under one 2-rank launch, each run listed in the JSON file
RUNS ([{"name", "overrides", "output_dir"}]) distills twice, with scheduler=sequential and
scheduler=overlap; rank 0 writes each run's histories and student directories to OUT.
Arguments: distill RUNS OUT (the launcher may add --local_rank)."""

import json
import sys

import torch

from tide_ds.config import load_config
from tide_ds.train import distill

_, runs_file, out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
with open(runs_file) as f:
    runs = json.load(f)
results = {}
for run in runs:
    for scheduler in ("sequential", "overlap"):
        over = run["overrides"] + [f"output_dir={run['output_dir']}/{scheduler}", f"train.scheduler={scheduler}"]
        result = distill(load_config(None, over))
        results.setdefault(run["name"], {})[scheduler] = {
            "history": result["history"],
            "student_dir": result["student_dir"],
            "teacher_calls": result["teacher_calls"],
        }
if torch.distributed.get_rank() == 0:
    with open(out, "w") as f:
        json.dump(results, f)
torch.distributed.barrier()
torch.distributed.destroy_process_group()
