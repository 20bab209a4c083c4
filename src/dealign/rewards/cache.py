"""What the model-based rewards share: a process-wide cache of loaded models (rewards hold a key, not
the model, so building a reward is instant and a model named by many rewards loads once), a bounded
memo of computed rows, right-padded batches, and the one-line error for a missing optional package."""

from __future__ import annotations

import threading
from contextlib import nullcontext
from typing import Any, Callable, Sequence

from ..extras import missing_message
from ..joint import joint
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


def forget_rows() -> None:
    """Empty every loaded reward model's memo of computed rows (an embedder's texts, a backbone's rows
    and kept prompt caches), so a timing run computes what it scores; the models stay loaded."""
    with _LOCK:
        loaded = list(_CACHE.values())
    for obj in loaded:
        if callable(getattr(obj, "reset", None)):
            obj.reset()
        elif isinstance(getattr(obj, "memo", None), dict):
            obj.memo.clear()


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


def memoised(memo: dict, keys: Sequence[Any], compute: Callable[[list], Sequence[Any]], size: int, *,
             lock: Any = None, joint_key: Any = None) -> list[Any]:
    """The value of every key, computing (once each, in one call) only the keys ``memo`` lacks; the memo is
    emptied first when it would grow past ``size``.

    ``lock`` guards the memo (``compute`` takes whatever lock it needs itself); it is not held while
    computing, so with ``joint_key`` the keys to compute can wait for a lock-step batch's step and be
    computed there with the other searches' keys (``dealign.joint``)."""
    guard = lock if lock is not None else nullcontext()
    distinct = list(dict.fromkeys(keys))
    with guard:
        found = {k: memo[k] for k in distinct if k in memo}
    todo = [k for k in distinct if k not in found]
    if todo:
        got = list(joint(joint_key, compute, todo) if joint_key is not None else compute(todo))
        found.update(zip(todo, got))
        with guard:
            if len(memo) + len(todo) > size:
                memo.clear()
            memo.update(zip(todo, got))
    return [found[k] for k in keys]
