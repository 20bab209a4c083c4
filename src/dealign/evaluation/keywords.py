"""The keyword task (CommonGen): input rows for the batch CLI and a summary of its output.

An answer counts as covering the keywords only if it is finished (ended with the end-of-sequence
token within the budget): a fragment cut at the token limit is not an answer.  Hard coverage is
reported both raw and counting finished answers only.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Iterable

from ..rewards import keyword_coverage
from .data import commongen
from .metrics import mean

# strategy label -> per-line settings for the batch CLI (anything not set comes from SearchConfig)
STRATEGY_ROWS: dict[str, dict[str, Any]] = {
    "greedy": {"strategy": "greedy"},
    "beam": {"strategy": "beam", "beam": 4},
    "best-of-n": {"strategy": "best-of-n", "n": 8},
    "sample": {"strategy": "sample"},
    "deal": {"strategy": "deal"},
    "deal-segment": {"strategy": "deal", "mode": "segment"},
}


def input_rows(n: int, strategies: Iterable[str], max_new_tokens: int = 32, offset: int = 0) -> list[dict]:
    """One batch-CLI row per (strategy, concept set)."""
    sets = commongen(n, offset=offset)
    rows = []
    for label in strategies:
        if label not in STRATEGY_ROWS:
            raise ValueError(f"unknown strategy {label!r}; choose from {', '.join(STRATEGY_ROWS)}")
        for cs in sets:
            rows.append(
                {"id": cs.id, "method": label, "prompt": cs.prompt, "keywords": cs.keywords,
                 "max_new_tokens": max_new_tokens, **STRATEGY_ROWS[label]}
            )
    return rows


def summarize(rows: list[dict], nll: Callable[[str, str], float] | None = None) -> list[dict]:
    """Per method: soft and hard coverage (raw and finished-only), finished share, tokens, seconds
    per prompt, ratio to greedy, and mean per-token NLL of the answers when ``nll`` is given."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r.get("method") or r.get("strategy", "?")].append(r)
    table = []
    for method, rs in groups.items():
        cov = [keyword_coverage(r["text"], r["keywords"]) for r in rs]
        hard = [c == 1.0 for c in cov]
        table.append({
            "method": method,
            "n": len(rs),
            "soft": mean(cov),
            "hard": mean([float(h) for h in hard]),
            "hard_finished": mean([float(h and r["finished"]) for h, r in zip(hard, rs)]),
            "finished": mean([float(r["finished"]) for r in rs]),
            "tokens": mean([r["tokens"] for r in rs]),
            "seconds": mean([r["seconds"] for r in rs]),
            "forward_passes": mean([r.get("stats", {}).get("forward_passes", math.nan) for r in rs]),
            "nll": mean([nll(r["prompt"], r["text"]) for r in rs]) if nll else math.nan,
        })
    greedy = next((t["seconds"] for t in table if t["method"] == "greedy"), math.nan)
    for t in table:
        t["x_greedy"] = t["seconds"] / greedy if greedy else math.nan
    return table


COLUMNS = [
    ("method", "method", "{}"), ("n", "n", "{}"), ("soft", "soft cov.", "{:.3f}"), ("hard", "hard cov. (raw)", "{:.3f}"),
    ("hard_finished", "hard cov. (finished)", "{:.3f}"), ("finished", "finished", "{:.2f}"),
    ("tokens", "tokens", "{:.1f}"), ("nll", "NLL/token", "{:.3f}"), ("forward_passes", "forward passes", "{:.1f}"),
    ("seconds", "s/prompt", "{:.2f}"), ("x_greedy", "× greedy", "{:.2f}"),
]


def markdown(table: list[dict]) -> str:
    head = "| " + " | ".join(c[1] for c in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [head, sep]
    for t in table:
        lines.append("| " + " | ".join(fmt.format(t[key]) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)
