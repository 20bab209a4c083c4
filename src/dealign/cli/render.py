"""``--explain``: the numbers behind one answer, as rich tables (why this text won, what it cost)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..api import GenerationResult
from ..rewards.base import WeightedSum


def _num(x: float) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def explain(result: GenerationResult, reward: WeightedSum, console: Console, missing: list[str] | None = None) -> None:
    """Print the reward breakdown, the answer's scores, the final beam and the search statistics.
    Generated text goes in as ``Text`` so brackets in it are never read as rich markup."""
    weights = dict(zip(reward.names, (w for _, w in reward.terms)))
    parts = Table(title="reward breakdown", title_justify="left")
    for col in ("reward", "score", "weight", "weighted"):
        parts.add_column(col, justify="left" if col == "reward" else "right")
    for name, value in result.rewards.items():
        w = weights.get(name, 1.0)
        parts.add_row(name, _num(value), _num(w), _num(w * value))
    parts.add_row(Text("total", style="bold"), "", "", Text(_num(result.reward), style="bold"))
    console.print(parts)

    summary = Table(title="answer", title_justify="left", show_header=False)
    summary.add_column(style="bold")
    summary.add_column()
    for label, value in (
        ("strategy", result.strategy),
        ("total reward", _num(result.reward)),
        ("logprob", _num(result.logprob)),
        ("score", _num(result.score)),
        ("finished", str(result.finished)),
        ("tokens", f"{result.num_tokens} generated, {result.prompt_tokens} in the prompt"),
    ):
        summary.add_row(label, value)
    if missing is not None:
        summary.add_row("missing keywords", ", ".join(missing) or "none")
    console.print(summary)

    beam = Table(title="final beam", title_justify="left")
    for col in ("#", "text", "score", "reward", "finished"):
        beam.add_column(col, justify="left" if col == "text" else "right")
    for i, h in enumerate(result.beam, 1):
        beam.add_row(str(i), Text(h["text"]), _num(h["score"]), _num(h["reward"]), str(h["finished"]))
    console.print(beam)

    stats = Table(title="search statistics", title_justify="left", show_header=False)
    stats.add_column(style="bold")
    stats.add_column(justify="right")
    for key, value in result.stats.items():
        stats.add_row(key.replace("_", " "), f"{value:.3f}" if key == "seconds" else _num(value))
    console.print(stats)
