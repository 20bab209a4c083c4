"""``dealign eval``'s arguments: ``--set STRATEGY.SETTING=VALUE`` read into search settings per strategy.
The run itself is :func:`dealign.evaluation.run.run_eval`."""

from __future__ import annotations

import json

from .options import UsageError


def parse_strategy_settings(items: list[str] | None) -> dict[str, dict]:
    """``["deal.lookahead=2", "best-of-n.n=16"]`` -> ``{"deal": {"lookahead": 2}, "best-of-n": {"n": 16}}``:
    search settings per strategy label (the label is everything before the last dot of the name, so
    ``"deal w=.75/.25.lam=5"`` works too); values are type-checked like the batch fields."""
    from .options import SEARCH_FIELDS, _check_search_value

    out: dict[str, dict] = {}
    for item in items or []:
        name, sep, raw = item.rpartition("=")
        label, dot, field = name.rpartition(".")
        if not sep or not dot or not label.strip():
            raise UsageError(f"--set takes STRATEGY.SETTING=VALUE (e.g. deal.lookahead=2), got {item!r}")
        label, field = label.strip(), field.strip()
        if field not in SEARCH_FIELDS:
            raise UsageError(f"--set {item!r}: {field!r} is not a search setting; settable: {', '.join(SEARCH_FIELDS)}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw.strip()
        out.setdefault(label, {})[field] = _check_search_value(field, value)
    return out
