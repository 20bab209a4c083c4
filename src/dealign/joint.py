"""Joint calls: one batched call where several searches running in lock-step call the same batched
function at the same step.

Why: lock-step batching (``backends/lockstep.py``) stacks the searches' forward passes, but each search
scores its own candidates.  A model reward's cost is a forward pass too (MiniLM, an LM's hidden
states, a classifier), so with eight searches a step made eight small reward batches where one of
eight times the rows costs little more.  A function that computes rows in a batch -- an embedder's
``encode``, a backbone's features -- calls ``joint(key, fn, rows)`` instead of ``fn(rows)``: alone it
is ``fn(rows)``; in a thread that belongs to a lock-step batch (``joining``), the batch's driver
concatenates the rows of every search calling the same ``key`` at that step, calls ``fn`` once and
hands each search its own slice.

Calls with the same ``key`` must be interchangeable: ``fn(a + b)`` is ``fn(a) + fn(b)`` (up to float
noise from padding), whichever caller's ``fn`` runs.  The key names the function and the object it
belongs to, e.g. ``("embed", id(embedder))``.

This module imports nothing of ours: rewards (which call ``joint``) and backends (whose ``Lockstep``
is the joiner) both sit above it.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Hashable, Iterator, Protocol, Sequence


class Joiner(Protocol):
    def join(self, key: Hashable, fn: Callable[[list], Sequence[Any]], rows: list) -> Sequence[Any]:
        """``fn(rows)``, computed together with the other callers of ``key`` at this step."""


_local = threading.local()


@contextmanager
def joining(joiner: Joiner | None) -> Iterator[None]:
    """Within the block, this thread's ``joint`` calls go through ``joiner`` (``None``: straight)."""
    before = getattr(_local, "joiner", None)
    _local.joiner = joiner
    try:
        yield
    finally:
        _local.joiner = before


def joint(key: Hashable, fn: Callable[[list], Sequence[Any]], rows: list) -> Sequence[Any]:
    """``fn(rows)`` -- joined with other searches' calls of the same ``key`` when this thread is in
    a lock-step batch.  ``fn`` returns one value per row (a list, or a tensor sliced on its first
    dimension)."""
    joiner = getattr(_local, "joiner", None)
    if joiner is None or not rows:
        return fn(rows)
    return joiner.join(key, fn, list(rows))
