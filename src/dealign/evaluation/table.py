"""The one markdown-table renderer of every summary (``dealign eval``, ``eval-reward``, ``bench``): rows of
dicts, a header per column and a way to print each cell."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, *,
                   headers: Mapping[str, str] | None = None,
                   cell: Callable[[str, Any], str] | None = None) -> str:
    """``rows`` as a markdown table: ``columns`` (default: the first row's keys) in order, each headed by
    ``headers[column]`` (default: its key), each cell printed by ``cell(column, value)`` (default: ``str``)."""
    cols = list(columns if columns is not None else rows[0])
    heads = headers or {}
    show = cell or (lambda _, value: str(value))
    lines = ["| " + " | ".join(heads.get(c, c) for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(show(c, r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
