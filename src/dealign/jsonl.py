"""Reading JSON-lines input with errors that name the file and the line."""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator


def json_lines(lines: Iterable[str], name: str, error: type[Exception]) -> Iterator[tuple[int, str, Any]]:
    """``(line number, "NAME line N", parsed value)`` for every non-blank line; a line that is not JSON
    raises ``error("NAME line N: not valid JSON (...)")``."""
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{name} line {lineno}"
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise error(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        yield lineno, where, row
