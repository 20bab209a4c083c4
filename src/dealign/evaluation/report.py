"""Summaries of evaluation answers: per-strategy tables laid out like the paper's (rows = strategies,
columns = metrics and compute cost), PNG plots, and one ``report.md`` that links them."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Callable

from ..extras import require
from .metrics import mean
from .table import markdown_table
from .tasks import Task

COST = ["tokens", "finished", "forward_passes", "seconds", "x_greedy"]
LABELS = {
    "soft": "soft cov.", "hard": "hard cov. (raw)", "hard_finished": "hard cov. (finished)",
    "sentence": "sentence", "hard_sentence": "finished ∧ every keyword ∧ sentence", "nll": "NLL/token",
    "bleu4": "BLEU-4", "rougeL": "ROUGE-L", "within_limit": "within limit", "overshoot": "overshoot (words)",
    "words": "words", "topic": "topic cov.", "within_and_on_topic": "within & on topic", "tokens": "tokens",
    "finished": "finished", "forward_passes": "forward passes", "seconds": "s/prompt", "x_greedy": "× greedy",
    "judged_harmless": "judged harmless", "R_harmless": "R_harmless (optimised)", "judge": "LM judge P(harmless)",
    "refusal": "refusals", "non_toxic": "non-toxic", "relevance": "relevance (MiniLM)",
    "judged_harmfulq": "judged harmless: HarmfulQ", "judged_hh": "judged harmless: HH",
    "judged_written": "judged harmless: written", "refused_harmful": "refused: harmful",
    "refused_benign": "refused: benign (over-refusal)", "relevance_benign": "relevance: benign",
    "turned_harmful": "refused, then turned to help: harmful",
    "R_helpful": "R_helpful (optimised)", "judge_helpful": "LM judge P(helpful)",
}


def summarize(task: Task, rows: list[dict], nll: Callable[[str, str], float] | None = None,
              judge: str | None = None) -> list[dict]:
    """One entry per strategy: mean metrics and cost.  ``judge``: the LM judge of tasks scored by model
    judges (default: theirs).  Each row gets its own metrics under ``"metrics"``."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["method"]].append(r)
    table = []
    for method, rs in groups.items():
        per_row = task.score(rs, judge)
        for r, m in zip(rs, per_row):
            r["metrics"] = m
        entry: dict = {"method": method, "n": len(rs)}
        for key in per_row[0]:
            entry[key] = mean([m[key] for m in per_row])
        if nll is not None:
            read = task.fluency_text or (lambda r: r["text"])
            entry["nll"] = mean([nll(r["prompt"], read(r)) for r in rs])
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
    """A summary table: metric columns first, then the cost columns, headed by their labels."""
    keys = [k for k in table[0] if k not in COST] + [k for k in COST if k in table[0]]
    return markdown_table(table, keys, headers=LABELS, cell=lambda _, v: _fmt(v))


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (the ``eval`` extra)."""
    require("matplotlib", "matplotlib", "dealign eval's plotting", "eval").use("Agg")
    return require("matplotlib.pyplot", "matplotlib", "dealign eval's plotting", "eval")


def plot_quality_vs_cost(task: Task, table: list[dict], path: Path) -> Path:
    """Quality (the task's main metric) against seconds per prompt, one point per strategy."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    markers = "osD^vP*Xhp"
    for i, t in enumerate(table):  # a legend, not labels at the points: strategies often land close together
        ax.scatter(t["seconds"], t[task.quality], s=45, marker=markers[i % len(markers)], label=t["method"])
    ax.legend(fontsize=8, loc="best", framealpha=0.8)
    ax.set_xlabel("seconds per prompt")
    ax.set_ylabel(LABELS.get(task.quality, task.quality))
    ax.set_title(f"{task.name}: quality against cost")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_form(task: Task, table: list[dict], path: Path) -> Path:
    """Per strategy: the task's constraint metric, the sentence-form rate and both together (bars), and
    fluency under the judge LM (NLL/token, right axis) where it was scored: a search that games its
    reward shows a tall first bar and a short last one."""
    plt = _pyplot()

    keys = list(task.form_metrics)
    fig, ax = plt.subplots(figsize=(max(6.4, 1.1 * len(table) + 2), 4.8), dpi=120)
    width = 0.8 / len(keys)
    for k, key in enumerate(keys):
        xs = [i + (k - (len(keys) - 1) / 2) * width for i in range(len(table))]
        ax.bar(xs, [t.get(key, math.nan) for t in table], width, label=LABELS.get(key, key), color=f"C{k}")
    ax.set_xticks(range(len(table)), [t["method"] for t in table], rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of answers")
    if all("nll" in t for t in table):
        ax2 = ax.twinx()
        ax2.plot(range(len(table)), [t["nll"] for t in table], "k--o", label="NLL/token (judge LM)")
        ax2.set_ylabel("NLL/token under the judge LM (lower = more fluent)")
        ax2.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.28), frameon=False)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=len(keys), frameon=False)
    ax.set_title(f"{task.name}: constraint, sentence form, both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_tradeoff(table: list[dict], path: Path) -> Path:
    """Harmlessness against helpfulness, one point per weight of the sweep (joined in weight order) and
    the other strategies (greedy, ...) as reference points: left the optimised rewards, right the
    independent judges."""
    plt = _pyplot()

    panels = [("R_helpful", "R_harmless", "rewards the search optimised"),
              ("relevance", "judged_harmless", "judges the search never saw")]
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.4), dpi=120)
    sweep = [t for t in table if t["method"].startswith("deal w=")]
    others = [t for t in table if not t["method"].startswith("deal w=")]
    for ax, (x, y, title) in zip(axes, panels):
        if sweep:
            ax.plot([t[x] for t in sweep], [t[y] for t in sweep], "-o", color="tab:blue", label="DeAL, w_harmless/w_helpful")
            for i, t in enumerate(sweep):  # labels alternate above/below, so close points stay readable
                ax.annotate(t["method"][len("deal w="):], (t[x], t[y]), textcoords="offset points",
                            xytext=(5, 4 if i % 2 == 0 else -11), fontsize=8)
        for i, t in enumerate(others):
            ax.scatter(t[x], t[y], marker="*" if t["method"] == "greedy" else "s", s=90, zorder=3, label=t["method"],
                       color=f"C{i + 1}")
        ax.set_xlabel(LABELS.get(x, x) + " → more helpful")
        ax.set_ylabel(LABELS.get(y, y) + " → more harmless")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle("harmless / helpful trade-off")
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
