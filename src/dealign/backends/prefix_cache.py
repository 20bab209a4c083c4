"""Recent prompts' KV caches, so a prompt that starts like one seen before is prefilled from there.

Why: prompts repeat their openings — a chat template's system prompt, an instruction, a few-shot
block, DeAL's own fluency context (the same short request for every prompt) — and a prefill costs
several decode steps (SmolLM2 on 2 cores: 240 ms for a 49-token chat prompt against ~100 ms for a
step of 8 rows).  In a batched server a new request's prefill stalls every running search for that
long.  Serving engines keep such prefixes (vLLM's automatic prefix caching); so does the local
backend: a least-recently-used set of one-row caches, bounded in bytes, looked up by the longest
common prefix of token ids.  The backend feeds only the rest of the prompt.

A hit changes no answer beyond float noise: the prefix's keys and values are the ones a full
prefill computes, and an exact repeat is bit for bit the first prefill's result.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass
class Entry:
    ids: tuple[int, ...]
    cache: Any  # the backend's one-row cache after ``ids`` (never extended in place: forks only)
    next_logprobs: torch.Tensor  # [1, vocab] after the last id
    nbytes: int


class PrefixCache:
    """Up to ``max_bytes`` of one-row prompt caches, least recently used evicted first."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"the prefix cache size must be >= 0 bytes; got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.tokens_saved = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def longest(self, ids: Sequence[int]) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with ``ids`` and that prefix's length (0: none)."""
        key = tuple(ids)
        with self._lock:
            exact = self._entries.get(key)
            if exact is not None:
                self._entries.move_to_end(key)
                return exact, len(key)
            best, best_len = None, 0
            for entry in self._entries.values():
                n = _common(entry.ids, key)
                if n > best_len:
                    best, best_len = entry, n
            if best is not None:
                self._entries.move_to_end(best.ids)
            return best, best_len

    def add(self, ids: Sequence[int], cache: Any, next_logprobs: torch.Tensor, nbytes: int) -> None:
        """Keep ``cache`` (one row, after ``ids``) unless it alone exceeds the budget."""
        key = tuple(ids)
        if nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[key] = Entry(key, cache, next_logprobs, nbytes)
            self._bytes += nbytes
            while self._bytes > self.max_bytes:
                _, gone = self._entries.popitem(last=False)
                self._bytes -= gone.nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


def _common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
