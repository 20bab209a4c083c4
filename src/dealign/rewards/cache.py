"""What the model-based rewards share: a process-wide cache of loaded models (rewards hold a key, not
the model, so building a reward is instant and a model named by many rewards loads once), a bounded
memo of computed rows, right-padded batches, and the one-line error for a missing optional package."""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

from ..extras import missing_message
from .base import RewardError

INPUTS = ("prompt+response", "response")  # what a model-based reward may score

# (kind, key) -> loaded object
_CACHE: dict[tuple[str, str], Any] = {}
_LOCK = threading.RLock()  # re-entrant: a cached object may build another (a backbone its LM)


def cached(kind: str, key: str, build: Callable[[], Any]) -> Any:
    """The object kept for ``(kind, key)``, built by ``build()`` on first use (once, even across threads)."""
    with _LOCK:
        if (kind, key) not in _CACHE:
            _CACHE[(kind, key)] = build()
        return _CACHE[(kind, key)]


def missing_package(package: str, pip_name: str, what: str) -> RewardError:
    """The one-line error for a reward whose optional package ``package`` is not installed."""
    return RewardError(missing_message(what, pip_name, "rewards"))


def check_input(input: str) -> str:
    """``input`` if it names what a reward may score (:data:`INPUTS`), else a clear error."""
    if input not in INPUTS:
        raise RewardError(f"input must be one of {', '.join(INPUTS)}; got {input!r}")
    return input


def batches(n: int, size: int) -> list[range]:
    """Index ranges that cut ``n`` rows into batches of at most ``size``."""
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def right_padded(rows: Sequence[Sequence[int]], pad: int):
    """Token-id rows as one right-padded batch: (ids, attention mask), both ``[rows, longest]`` long tensors."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[j, : len(r)] = 1
    return ids, mask


def memoised(memo: dict, keys: Sequence[Any], compute: Callable[[list], Sequence[Any]], size: int) -> list[Any]:
    """The value of every key, computing (once each, in one call) only the keys ``memo`` lacks; the memo is
    emptied first when it would grow past ``size``."""
    todo = list(dict.fromkeys(k for k in keys if k not in memo))
    if todo:
        got = list(compute(todo))
        if len(memo) + len(todo) > size:
            memo.clear()
        memo.update(zip(todo, got))
    return [memo[k] for k in keys]
