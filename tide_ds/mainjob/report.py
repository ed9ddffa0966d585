"""Stage 6: results.json, results.md, PNG plots and TensorBoard events from the stage outputs.

results.json holds only what the seeds determine (no times: those go to timings.json), so two
runs with the same seeds write identical files. Every student is trained once per seed (its
initialisation, data order and noise); results are per seed, as mean +- sample standard deviation
over seeds, and as each recipe's difference to `ce` paired by seed (same initialisation, batches and
noise), with the standard deviation of those differences. Per-term training curves come from a run's
`metrics.jsonl` (one JSON object per log step) when the training loop wrote one, else from the
history `distill` returned (saved as history.json); TensorBoard events are written here only for
runs whose output has no `tb` directory of its own.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shutil

from tide_ds.config import ConfigError

EXTRA = "pip install 'tide_ds[eval]'"
TERM_KEYS = ("ce", "kl", "reverse_kl", "calm", "reverse_calm", "tidal", "loss")


def check_dependencies() -> None:
    missing = [m for m in ("matplotlib", "tensorboard") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"the main job's plots and TensorBoard events need {', '.join(missing)}: {EXTRA}")


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def training_curve(run_dir: str) -> list[dict]:
    jsonl = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(jsonl):
        with open(jsonl, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    return _read_json(os.path.join(run_dir, "history.json"))


def seed_dir(path: str, seed: int) -> str:
    return os.path.join(path, f"seed{seed}")


def spread(values) -> dict:
    """Mean and sample standard deviation (0 for one value)."""
    values = [float(v) for v in values]
    m = mean(values)
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return {"mean": m, "std": math.sqrt(var), "n": len(values)}


def mean_bpb(run: dict) -> float:
    return mean(v["bpb"] for v in run["bpb"].values())


def summarise(runs: dict[str, dict]) -> dict:
    """{bpb, nll: {ratio: spread}, mean_bpb: spread} over the seeds' runs."""
    ratios = list(next(iter(runs.values()))["bpb"])
    return {
        "bpb": {r: spread(run["bpb"][r]["bpb"] for run in runs.values()) for r in ratios},
        "nll": {r: spread(run["bpb"][r]["nll"] for run in runs.values()) for r in ratios},
        "mean_bpb": spread(mean_bpb(run) for run in runs.values()),
    }


def paired(runs: dict[str, dict], base: dict[str, dict]) -> dict:
    """{bpb: {ratio: spread}, mean_bpb: spread} of the per-seed differences runs - base."""
    ratios = list(next(iter(runs.values()))["bpb"])
    return {
        "bpb": {r: spread(runs[s]["bpb"][r]["bpb"] - base[s]["bpb"][r]["bpb"] for s in runs) for r in ratios},
        "mean_bpb": spread(mean_bpb(runs[s]) - mean_bpb(base[s]) for s in runs),
    }


def collect(cfg, out: str) -> dict:
    data = _read_json(os.path.join(out, "data", "summary.json"))
    models = {}
    for name in ["init"] + list(cfg.recipes):
        runs = {}
        for seed in cfg.seeds:
            run = _read_json(os.path.join(seed_dir(os.path.join(out, "eval", name), seed), "results.json"))
            if name != "init":
                curve = training_curve(seed_dir(os.path.join(out, "students", name), seed))
                run["final_train_terms"] = {k: v for k, v in curve[-1].items() if k in TERM_KEYS}
            runs[str(seed)] = run
        models[name] = {
            "terms": {} if name == "init" else cfg.recipes[name]["terms"],
            "recipe": None if name == "init" else cfg.recipes[name]["recipe"],
            "seeds": runs,
            "summary": summarise(runs),
        }
    if "ce" in models:
        for name, m in models.items():
            if name not in ("init", "ce"):
                m["vs_ce"] = paired(m["seeds"], models["ce"]["seeds"])
    teacher = _read_json(os.path.join(out, "eval", "teacher", "results.json"))
    return {
        "seed": cfg.seed,
        "seeds": list(cfg.seeds),
        "config": dataclasses.asdict(cfg),
        "data": data,
        "teacher": teacher,
        "models": models,
    }


def mean(values) -> float:
    values = list(values)
    return sum(values) / max(len(values), 1)


def pm(s: dict, digits: int = 3, sign: bool = False) -> str:
    """'mean ± std' of a spread (the mean alone for one seed)."""
    fmt = f"{{:{'+' if sign else ''}.{digits}f}}"
    return fmt.format(s["mean"]) + (f" ± {s['std']:.{digits}f}" if s["n"] > 1 else "")


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def loss_table(results: dict) -> str:
    """Bits per byte of the masked chunks' bytes (one measure across tokenizers) and NLL per own token
    of those chunks, by masking ratio, mean ± std over seeds: the teacher (trained once) and every
    student on the same masked chunks."""
    ratios = list(results["teacher"]["bpb"])
    head = ["model", "terms"] + [f"bpb@{r}" for r in ratios] + ["mean bpb"] + [f"NLL@{r}" for r in ratios]
    lines = [_row(head), "|" + "---|" * len(head)]
    t = results["teacher"]["bpb"]
    one = {"n": 1, "std": 0.0}
    teacher = [one | {"mean": t[r]["bpb"]} for r in ratios] + [one | {"mean": mean(t[r]["bpb"] for r in ratios)}]
    teacher += [one | {"mean": t[r]["nll"]} for r in ratios]
    lines.append(_row(["teacher", "(tokenizer A, trained once)"] + [pm(c) for c in teacher]))
    for name, m in results["models"].items():
        summary = m["summary"]
        cells = [summary["bpb"][r] for r in ratios] + [summary["mean_bpb"]] + [summary["nll"][r] for r in ratios]
        lines.append(_row([name, _terms(m)] + [pm(c) for c in cells]))
    return "\n".join(lines)


def verdict(d: dict) -> str:
    """Whether a paired difference lies beyond twice its standard deviation (n > 1 seeds), at the
    table's precision (so that 0.000 ± 0.000 reads as no difference)."""
    if d["n"] < 2:
        return "one seed"
    m, s = round(d["mean"], 3), round(d["std"], 3)
    if m < -2 * s:
        return "better"
    return "worse" if m > 2 * s else "within 2 std"


def difference_table(results: dict) -> str:
    """Each recipe's bits per byte minus the `ce` student's of the same seed: mean ± std of the differences."""
    rows = {name: m["vs_ce"] for name, m in results["models"].items() if "vs_ce" in m}
    if not rows:
        return ""
    ratios = list(results["teacher"]["bpb"])
    head = ["recipe"] + [f"Δbpb@{r}" for r in ratios] + ["mean Δbpb", "vs ce (2 std)"]
    lines = [_row(head), "|" + "---|" * len(head)]
    for name, d in rows.items():
        cells = [pm(d["bpb"][r], sign=True) for r in ratios] + [pm(d["mean_bpb"], sign=True), verdict(d["mean_bpb"])]
        lines.append(_row([name] + cells))
    return "\n".join(lines)


def agreement_table(results: dict) -> str:
    head = ["model", "chunk corr", "chunk gap", "chunk agree", "chunk acc", "HumanEval pass@1"]
    lines = [_row(head), "|" + "---|" * len(head)]
    keys = ("chunk_corr", "chunk_gap", "chunk_agreement", "student_chunk_acc")
    for name, m in results["models"].items():
        runs = list(m["seeds"].values())
        cells = [pm(spread(run["agreement"][k] for run in runs), 2 if k == "chunk_gap" else 3) for k in keys]
        he = [run["humaneval"] for run in runs if "humaneval" in run]
        passed = f"{sum(h['passed'] for h in he)}/{sum(h['problems'] for h in he)}" if he else "-"
        lines.append(_row([name] + cells + [passed]))
    first = next(iter(results["models"].values()))
    teacher_acc = next(iter(first["seeds"].values()))["agreement"]["teacher_chunk_acc"]
    return "\n".join(lines) + f"\n\nTeacher's greedy chunk accuracy on the same chunks: {teacher_acc:.3f}."


def _terms(m: dict) -> str:
    return " + ".join(f"{w:g} {t}" for t, w in m["terms"].items()) or "(no training)"


def table(results: dict) -> str:
    return "\n\n".join(t for t in (loss_table(results), difference_table(results), agreement_table(results)) if t)


def markdown(results: dict) -> str:
    parts = [
        "# Main job results",
        "",
        "Held-out loss on the same masked chunks for the teacher and every student (whole chunks masked "
        "at fixed masking ratios, the same draws for every model): bits per byte of the masked chunks' "
        "bytes (bpb, comparable across the two tokenizers) and NLL in nats per masked token of the "
        "model's own tokenizer (not comparable between teacher and students). Lower is better.",
        "",
        loss_table(results),
        "",
        f"Seeds {', '.join(map(str, results['seeds']))}: each seed is one student initialisation, data order and "
        "noise, shared by every recipe; cells are mean ± sample standard deviation over seeds. Paired by seed, "
        "each recipe's bits per byte minus the `ce` student's (negative: better than the no-teacher baseline); "
        "'better' / 'worse' where the mean difference lies beyond twice its standard deviation:",
        "",
        difference_table(results),
        "",
        "At masking ratio 0.5, against the teacher: correlation of student and teacher chunk log-probs, "
        "mean |chunk log-prob gap| in nats, agreement (both spell a masked chunk greedily, or both miss), "
        "and the student's greedy chunk accuracy. HumanEval: greedy pass@1 (passed / problems, all seeds).",
        "",
        agreement_table(results),
        "",
        "## Samples (greedy, held-out prompts)",
        "",
    ]
    first = str(results["seeds"][0])
    for name, m in results["models"].items():
        if name == "init":
            continue
        s = m["seeds"][first]["samples"][0]
        parts += [f"**{name}** (seed {first})", "", "```", s["prompt"] + "⟨" + s["completion"] + "⟩", "```", ""]
    return "\n".join(parts)


def plots(cfg, out: str, results: dict, objective) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from tide_ds.objectives import tidal_lambda

    pdir = os.path.join(out, "plots")
    os.makedirs(pdir, exist_ok=True)
    files = []

    curves = {  # (recipe, seed) -> curve
        (n, seed): training_curve(seed_dir(os.path.join(out, "students", n), seed))
        for n in cfg.recipes
        for seed in cfg.seeds
    }
    color = {name: f"C{i}" for i, name in enumerate(["teacher"] + list(results["models"]))}
    terms = [k for k in TERM_KEYS if any(k in c[0] for c in curves.values())]
    cols = min(3, len(terms))
    rows = -(-len(terms) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(terms) :]:
        ax.axis("off")
    for ax, term in zip(axes.flat, terms):
        for (name, seed), curve in curves.items():  # one line per seed: the spread shows
            pts = [(c["step"], c[term]) for c in curve if term in c]
            if pts:
                label = name if seed == cfg.seeds[0] else None
                ax.plot(*zip(*pts), label=label, color=color[name], linewidth=0.8, alpha=0.8)
        ax.set_title(term if term != "loss" else "total loss")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.suptitle(f"Training loss per term and recipe (one line per seed, seeds {cfg.seeds})")
    fig.tight_layout()
    files.append(_save(fig, pdir, "loss_terms.png"))

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    progress = torch.linspace(0, 1, 101)
    tidal = objective.tidal
    for t in (0.1, 0.5, 0.9):
        lam = [
            float(
                tidal_lambda(
                    torch.tensor([t]),
                    float(p),
                    lambda_init=tidal.lambda_init,
                    lambda_max=tidal.lambda_max,
                    schedule=tidal.schedule,
                    axis=tidal.axis,
                )
            )
            for p in progress
        ]
        ax.plot(progress.numpy(), lam, label=f"mask ratio t = {t}")
    ax.set_xlabel("training progress")
    ax.set_ylabel("lambda (weight of the teacher)")
    ax.set_title(f"TIDAL lambda schedule ({tidal.schedule}, axis {tidal.axis})")
    ax.legend()
    fig.tight_layout()
    files.append(_save(fig, pdir, "tidal_lambda.png"))

    fig, (ax, diff) = plt.subplots(1, 2, figsize=(11, 3.8))
    ratios = list(results["teacher"]["bpb"])
    x = [float(r) for r in ratios]
    ax.plot(x, [results["teacher"]["bpb"][r]["bpb"] for r in ratios], "o:", label="teacher", color=color["teacher"])
    for name, m in results["models"].items():  # error bars: ± one standard deviation over seeds
        bpb = [m["summary"]["bpb"][r] for r in ratios]
        style = "o--" if name == "init" else "o-"
        ax.errorbar(
            x,
            [b["mean"] for b in bpb],
            yerr=[b["std"] for b in bpb],
            fmt=style,
            capsize=3,
            label=name,
            color=color[name],
        )
        if "vs_ce" in m:
            d = [m["vs_ce"]["bpb"][r] for r in ratios]
            diff.errorbar(
                x,
                [v["mean"] for v in d],
                yerr=[v["std"] for v in d],
                fmt="o-",
                capsize=3,
                label=name,
                color=color[name],
            )
    ax.set_xlabel("masking ratio")
    ax.set_ylabel("bits per byte of the masked chunks")
    ax.set_title("Held-out bits per byte (mean ± std over seeds)")
    ax.legend(fontsize=8)
    diff.axhline(0.0, color="grey", linewidth=0.8)
    diff.set_xlabel("masking ratio")
    diff.set_ylabel("bits per byte minus ce's (same seed)")
    diff.set_title("Paired difference to the no-teacher baseline")
    if any("vs_ce" in m for m in results["models"].values()):
        diff.legend(fontsize=8)
    fig.tight_layout()
    files.append(_save(fig, pdir, "heldout_bpb.png"))
    return files


def _save(fig, pdir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(pdir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tensorboard(cfg, out: str, results: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter

    for name in cfg.recipes:
        for seed in cfg.seeds:
            run_dir = seed_dir(os.path.join(out, "students", name), seed)
            tb_dir = seed_dir(os.path.join(out, "tb", name), seed)
            if os.path.isdir(tb_dir):
                shutil.rmtree(tb_dir)  # written whole each time, never appended to
            writer = SummaryWriter(tb_dir)
            if not os.path.isdir(os.path.join(run_dir, "tb")):
                for row in training_curve(run_dir):
                    for k, v in row.items():
                        if k != "step" and isinstance(v, (int, float)):
                            writer.add_scalar(f"train/{k}", v, row["step"])
            for r, v in results["models"][name]["seeds"][str(seed)]["bpb"].items():
                writer.add_scalar(f"eval/bpb_ratio_{r}", v["bpb"], cfg.student_steps)
                writer.add_scalar(f"eval/nll_ratio_{r}", v["nll"], cfg.student_steps)
            writer.close()


def write(cfg, out: str, timings: dict) -> dict:

    from tide_ds.config import Config, load_dataclass
    from tide_ds.mainjob.config import config_path

    results = collect(cfg, out)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(markdown(results) + "\n")
    objective = load_dataclass(Config, config_path("demo_student.yaml")).objective
    plots(cfg, out, results, objective)
    tensorboard(cfg, out, results)
    timing_file = os.path.join(out, "timings.json")
    previous = _read_json(timing_file) if os.path.isfile(timing_file) else {}
    with open(timing_file, "w", encoding="utf-8") as f:
        json.dump({**previous, **timings}, f, indent=1)
    print(table(results))
    return results
