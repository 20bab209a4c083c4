"""Summaries of evaluation answers: per-strategy tables laid out like the paper's (rows = strategies,
columns = metrics and compute cost), PNG plots, and one ``report.md`` that links them."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Callable

from .metrics import mean
from .tasks import Task

COST = ["tokens", "finished", "forward_passes", "seconds", "x_greedy"]
LABELS = {
    "soft": "soft cov.", "hard": "hard cov. (raw)", "hard_finished": "hard cov. (finished)", "nll": "NLL/token",
    "bleu4": "BLEU-4", "rougeL": "ROUGE-L", "within_limit": "within limit", "overshoot": "overshoot (words)",
    "words": "words", "topic": "topic cov.", "within_and_on_topic": "within & on topic", "tokens": "tokens",
    "finished": "finished", "forward_passes": "forward passes", "seconds": "s/prompt", "x_greedy": "× greedy",
}


def summarize(task: Task, rows: list[dict], nll: Callable[[str, str], float] | None = None) -> list[dict]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["method"]].append(r)
    table = []
    for method, rs in groups.items():
        per_row = [task.metrics(r) for r in rs]
        entry: dict = {"method": method, "n": len(rs)}
        for key in per_row[0]:
            entry[key] = mean([m[key] for m in per_row])
        if nll is not None:
            entry["nll"] = mean([nll(r["prompt"], r["text"]) for r in rs])
        if task.corpus_metrics:
            entry.update(task.corpus_metrics(rs))
        entry["tokens"] = mean([r["tokens"] for r in rs])
        entry["finished"] = mean([float(r["finished"]) for r in rs])
        entry["forward_passes"] = mean([r.get("stats", {}).get("forward_passes", math.nan) for r in rs])
        entry["seconds"] = mean([r["seconds"] for r in rs])
        table.append(entry)
    greedy = next((t["seconds"] for t in table if t["method"] == "greedy"), math.nan)
    for t in table:
        t["x_greedy"] = t["seconds"] / greedy if greedy == greedy and greedy > 0 else math.nan
    return table


def _fmt(v) -> str:
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def markdown(table: list[dict]) -> str:
    keys = [k for k in table[0] if k not in COST] + [k for k in COST if k in table[0]]
    lines = ["| " + " | ".join(LABELS.get(k, k) for k in keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(t[k]) for k in keys) + " |" for t in table]
    return "\n".join(lines)


def plot_quality_vs_cost(task: Task, table: list[dict], path: Path) -> Path:
    """Quality (the task's main metric) against seconds per prompt, one point per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for t in table:
        ax.scatter(t["seconds"], t[task.quality], s=40)
        ax.annotate(t["method"], (t["seconds"], t[task.quality]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("seconds per prompt")
    ax.set_ylabel(LABELS.get(task.quality, task.quality))
    ax.set_title(f"{task.name}: quality against cost")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(out: Path, header: str, sections: list[tuple[Task, list[dict], list[Path]]]) -> Path:
    parts = [f"# dealign evaluation\n\n{header}\n"]
    for task, table, plots in sections:
        parts.append(f"## {task.name}\n\n{task.describe}\n\n{markdown(table)}\n")
        parts += [f"![{p.stem}]({p.name})\n" for p in plots]
    path = out / "report.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
