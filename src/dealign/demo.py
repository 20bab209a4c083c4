"""``dealign demo``: greedy decoding vs DeAL on CommonGen-style keyword sets, side by side.

The point is to show what the search buys on a task where the model alone often drops a word:
same model, same prompt, the only change is decoding with a keyword-coverage reward.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .evaluation.data import KEYWORD_PROMPT
from .rewards import from_options, keywords_found

CONCEPT_SETS = [
    ["dog", "frisbee", "catch", "throw"],
    ["field", "look", "stand"],
    ["kid", "dance", "room"],
    ["mountain", "ski", "skier"],
]
MAX_NEW_TOKENS = 32


def _prompt(words: list[str]) -> str:
    return KEYWORD_PROMPT.format(words=", ".join(words))


def _run(aligner: Any, words: list[str], **search: Any) -> dict[str, Any]:
    start = time.perf_counter()
    # what `dealign generate --keywords` builds: keyword coverage plus the well_formed and finish_with_keywords rewards
    res = aligner.generate(_prompt(words), reward=from_options(keywords=words), max_new_tokens=MAX_NEW_TOKENS, **search)
    found = keywords_found(res.text, words)
    return {
        "text": res.text,
        "coverage": sum(found) / len(found),
        "missing": [w for w, ok in zip(words, found) if not ok],
        "seconds": time.perf_counter() - start,
        "finished": res.finished,
    }


def _coverage_cell(run: dict[str, Any]) -> Text:
    cell = Text(f"{run['coverage']:.2f}", style="green" if not run["missing"] else "")
    if run["missing"]:
        cell.append(f"\nmissing: {', '.join(run['missing'])}", style="red")
    return cell


def _summary(runs: list[dict[str, Any]]) -> dict[str, float]:
    return {
        "coverage": sum(r["coverage"] for r in runs) / len(runs),
        "hard_coverage": sum(not r["missing"] for r in runs) / len(runs),
        "seconds": sum(r["seconds"] for r in runs),
    }


def run_demo(model: Any = None, n: int = 4, console: Console | None = None) -> dict[str, Any]:
    """Run greedy and DeAL (SearchConfig defaults, strategy deal) on the first ``n`` concept sets and
    print a comparison table.  ``model`` is anything ``--model`` takes, or an ``Aligner`` already
    loaded.  Returns ``{"rows": [...], "greedy": summary, "deal": summary}`` for scripted use."""
    if not isinstance(n, int) or not 1 <= n <= len(CONCEPT_SETS):
        raise ValueError(f"n must be between 1 and {len(CONCEPT_SETS)} (the built-in keyword sets), got {n!r}")
    console = console or Console()
    if hasattr(model, "generate"):
        aligner = model
    else:
        from .batch import AlignerSpec  # progress notes on stderr

        aligner = AlignerSpec(model).build()

    rows = []
    for words in CONCEPT_SETS[:n]:
        rows.append({"keywords": words, "greedy": _run(aligner, words, strategy="greedy"), "deal": _run(aligner, words, strategy="deal")})

    table = Table(title=f"greedy vs DeAL ({MAX_NEW_TOKENS} new tokens, reward = keyword coverage + well-formed + finish with every keyword, fluency term on)", show_lines=True)
    for col in ("keywords", "greedy", "cov", "s", "DeAL", "cov", "s", "finished\ngreedy/DeAL"):
        table.add_column(col, justify="right" if col in ("cov", "s") else "left")
    for row in rows:
        g, d = row["greedy"], row["deal"]
        table.add_row(
            Text(", ".join(row["keywords"])),
            Text(g["text"]), _coverage_cell(g), f"{g['seconds']:.1f}",
            Text(d["text"]), _coverage_cell(d), f"{d['seconds']:.1f}",
            f"{'yes' if g['finished'] else 'no'}/{'yes' if d['finished'] else 'no'}",
        )
    console.print(table)

    out = {"rows": rows}
    for name, label in (("greedy", "greedy"), ("deal", "DeAL")):
        s = out[name] = _summary([r[name] for r in rows])
        console.print(
            f"{label:>6}: mean coverage {s['coverage']:.2f}, all keywords in "
            f"{round(s['hard_coverage'] * len(rows))}/{len(rows)} ({s['hard_coverage']:.2f}), {s['seconds']:.1f} s",
            highlight=False,
        )
    return out
