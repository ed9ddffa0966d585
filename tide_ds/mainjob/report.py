"""Stage 6: results.json, results.md, PNG plots and TensorBoard events from the stage outputs.

results.json holds only what the seed determines (no times: those go to timings.json), so two
runs with the same seed write identical files. Per-term training curves come from a run's
`metrics.jsonl` (one JSON object per log step) when the training loop wrote one, else from the
history `distill` returned (saved as history.json); TensorBoard events are written here only for
runs whose output has no `tb` directory of its own.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
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


def collect(cfg, out: str) -> dict:
    data = _read_json(os.path.join(out, "data", "summary.json"))
    models = {}
    for name in ["init"] + list(cfg.recipes):
        ev = _read_json(os.path.join(out, "eval", name, "results.json"))
        entry = {
            "terms": {} if name == "init" else cfg.recipes[name]["terms"],
            "recipe": None if name == "init" else cfg.recipes[name]["recipe"],
            **ev,
        }
        if name != "init":
            curve = training_curve(os.path.join(out, "students", name))
            entry["final_train_terms"] = {k: v for k, v in curve[-1].items() if k in TERM_KEYS}
        models[name] = entry
    teacher = _read_json(os.path.join(out, "eval", "teacher", "results.json"))
    return {"seed": cfg.seed, "config": dataclasses.asdict(cfg), "data": data, "teacher": teacher, "models": models}


def mean(values) -> float:
    values = list(values)
    return sum(values) / max(len(values), 1)


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def loss_table(results: dict) -> str:
    """Bits per byte of the masked chunks' bytes (one measure across tokenizers) and NLL per own token
    of those chunks, by masking ratio: the teacher and every student on the same masked chunks."""
    models = {"teacher": results["teacher"]} | results["models"]
    ratios = list(results["teacher"]["bpb"])
    head = ["model", "terms"] + [f"bpb@{r}" for r in ratios] + ["mean bpb"] + [f"NLL@{r}" for r in ratios]
    lines = [_row(head), "|" + "---|" * len(head)]
    for name, m in models.items():
        terms = "(teacher, tokenizer A)" if name == "teacher" else _terms(m)
        bpb = [m["bpb"][r]["bpb"] for r in ratios]
        cells = [name, terms] + [f"{v:.3f}" for v in bpb] + [f"{mean(bpb):.3f}"]
        lines.append(_row(cells + [f"{m['bpb'][r]['nll']:.3f}" for r in ratios]))
    return "\n".join(lines)


def agreement_table(results: dict) -> str:
    head = ["model", "chunk corr", "chunk gap", "chunk agree", "chunk acc", "HumanEval pass@1"]
    lines = [_row(head), "|" + "---|" * len(head)]
    for name, m in results["models"].items():
        a, he = m["agreement"], m.get("humaneval")
        cells = [
            name,
            f"{a['chunk_corr']:.3f}",
            f"{a['chunk_gap']:.2f}",
            f"{a['chunk_agreement']:.3f}",
            f"{a['student_chunk_acc']:.3f}",
            f"{he['passed']}/{he['problems']}" if he else "-",
        ]
        lines.append(_row(cells))
    teacher_acc = next(iter(results["models"].values()))["agreement"]["teacher_chunk_acc"]
    return "\n".join(lines) + f"\n\nTeacher's greedy chunk accuracy on the same chunks: {teacher_acc:.3f}."


def _terms(m: dict) -> str:
    return " + ".join(f"{w:g} {t}" for t, w in m["terms"].items()) or "(no training)"


def table(results: dict) -> str:
    return loss_table(results) + "\n\n" + agreement_table(results)


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
        "At masking ratio 0.5, against the teacher: correlation of student and teacher chunk log-probs, "
        "mean |chunk log-prob gap| in nats, agreement (both spell a masked chunk greedily, or both miss), "
        "and the student's greedy chunk accuracy. HumanEval: greedy pass@1 (passed / problems).",
        "",
        agreement_table(results),
        "",
        "## Samples (greedy, held-out prompts)",
        "",
    ]
    for name, m in results["models"].items():
        if name == "init":
            continue
        s = m["samples"][0]
        parts += [f"**{name}**", "", "```", s["prompt"] + "⟨" + s["completion"] + "⟩", "```", ""]
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

    curves = {n: training_curve(os.path.join(out, "students", n)) for n in cfg.recipes}
    terms = [k for k in TERM_KEYS if any(k in c[0] for c in curves.values())]
    cols = min(3, len(terms))
    rows = -(-len(terms) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(terms) :]:
        ax.axis("off")
    for ax, term in zip(axes.flat, terms):
        for name, curve in curves.items():
            pts = [(c["step"], c[term]) for c in curve if term in c]
            if pts:
                ax.plot(*zip(*pts), label=name)
        ax.set_title(term if term != "loss" else "total loss")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.suptitle("Training loss per term and recipe")
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
    models = {"teacher": results["teacher"]} | results["models"]
    base = results["models"].get("ce")
    color = {name: f"C{i}" for i, name in enumerate(models)}  # one colour per model, both panels
    for name, m in models.items():
        ratios = [float(r) for r in m["bpb"]]
        bpb = [v["bpb"] for v in m["bpb"].values()]
        style = {"init": "--", "teacher": ":"}.get(name, "-")
        ax.plot(ratios, bpb, marker="o", label=name, linestyle=style, color=color[name])
        if base is not None and name not in ("init", "teacher"):
            gap = [m["bpb"][r]["bpb"] - base["bpb"][r]["bpb"] for r in m["bpb"]]
            diff.plot(ratios, gap, marker="o", label=name, color=color[name])
    ax.set_xlabel("masking ratio")
    ax.set_ylabel("bits per byte of the masked chunks")
    ax.set_title("Held-out bits per byte by masking ratio")
    ax.legend(fontsize=8)
    diff.axhline(0.0, color="grey", linewidth=0.8)
    diff.set_xlabel("masking ratio")
    diff.set_ylabel("bits per byte minus the ce student's")
    diff.set_title("Relative to the no-teacher baseline")
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
        run_dir = os.path.join(out, "students", name)
        tb_dir = os.path.join(out, "tb", name)
        if os.path.isdir(tb_dir):
            shutil.rmtree(tb_dir)  # written whole each time, never appended to
        writer = SummaryWriter(tb_dir)
        if not os.path.isdir(os.path.join(run_dir, "tb")):
            for row in training_curve(run_dir):
                for k, v in row.items():
                    if k != "step" and isinstance(v, (int, float)):
                        writer.add_scalar(f"train/{k}", v, row["step"])
        for r, v in results["models"][name]["bpb"].items():
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
