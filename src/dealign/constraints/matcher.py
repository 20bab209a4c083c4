"""A constraint bound to a tokenizer (``Grammar``) and the per-row matcher states that ride with a
search's rows (``RowMatchers``), on llguidance.

The backend's side of the contract is duck-typed (backends import nothing from here): a beam's
``constraint`` is a ``RowMatchers`` with one entry per row (``None`` for an unconstrained row, e.g.
the fluency context's), and the backend calls

* ``fork(parents)`` when a rollout starts from the beam's rows (a deep copy per row, repeats allowed),
* ``advance(tokens, alive)`` after every token the rows take (forced or generated),
* ``mask(logprobs, alive)`` on every next-token distribution it stores or draws from,
* ``commit(rows, keep)`` for the next beam: each kept row's state after its first ``keep`` tokens
  (a fork rolled back to there; never a replay from the start).

Masked log-probabilities are renormalised over the allowed tokens: the constrained model's own
distribution, so a token the format forces costs nothing and a score stays comparable across steps.
End-of-sequence is allowed only where the grammar accepts, and is never fed to a matcher (the row
ends there), so a rollback never crosses a stop.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np
import torch

from . import Constraint, ConstraintError

_TOKENIZERS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
_TOKENIZER_LOCK = threading.Lock()
GRAMMAR_CACHE = 64  # compiled constraints kept per backend


def _ll_tokenizer(tokenizer: Any, vocab: int, eos: tuple[int, ...]):
    """llguidance's view of a Hugging Face fast tokenizer (about 1 s for a 49k vocabulary), cached."""
    import llguidance.hf

    with _TOKENIZER_LOCK:  # searches of one batch start together: build it once
        per = _TOKENIZERS.setdefault(tokenizer, {})
        key = (vocab, eos)
        if key not in per:
            try:
                per[key] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=list(eos))
            except Exception as exc:  # noqa: BLE001 - a slow tokenizer, an unsupported pre-tokenizer
                raise ConstraintError(f"constraints need a fast (tokenizers-library) tokenizer that llguidance can "
                                      f"read: {type(tokenizer).__name__}: {exc}") from None
        return per[key]


class Grammar:
    """A constraint compiled for one backend's tokenizer: starts fresh matchers and computes masks."""

    def __init__(self, constraint: Constraint, tokenizer: Any, vocab: int, eos_ids: Sequence[int]) -> None:
        from llguidance import LLExecutor, LLMatcher

        self.constraint = constraint
        self.vocab = int(vocab)
        self.eos = tuple(sorted(int(e) for e in eos_ids))
        self.tokenizer = _ll_tokenizer(tokenizer, self.vocab, self.eos)
        self._matcher = LLMatcher(self.tokenizer, constraint.grammar_text, log_level=0)
        if self._matcher.is_error():
            raise ConstraintError(f"invalid {constraint.describe()}: {' '.join(self._matcher.get_error().split())[:300]}")
        self.executor = LLExecutor(num_threads=1)
        self.mask_seconds = 0.0  # time spent computing and applying masks (the bench reports it)
        self.mask_rows = 0
        first = self.allowed([self._matcher])[0]
        first[[e for e in self.eos if e < self.vocab]] = False  # llguidance offers the end at a dead end
        if not bool(first.any()) and not self._matcher.is_accepting():
            raise ConstraintError(f"no token of the model's vocabulary can start the {constraint.describe()} "
                                  "constraint; check it against what the tokenizer can write")

    def start(self, rows: int = 1, constrained: Sequence[int] = (0,)) -> "RowMatchers":
        """A beam's states: fresh matchers on rows ``constrained``, None elsewhere."""
        return RowMatchers(self, [self._matcher.deep_copy() if r in constrained else None for r in range(rows)])

    def allowed(self, matchers: Sequence[Any]) -> torch.Tensor:
        """``[len(matchers), vocab]`` bool: the tokens each matcher allows next."""
        import llguidance.torch as lt

        bitmask = lt.allocate_token_bitmask(len(matchers), self.vocab)
        if len(matchers) == 1:
            lt.fill_next_token_bitmask(matchers[0], bitmask, 0)
        else:
            lt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, : self.vocab]
        return torch.from_numpy(bits).view(torch.bool)


class RowMatchers:
    """One matcher state per row (``None``: the row is not constrained)."""

    def __init__(self, grammar: Grammar, rows: list[Any]) -> None:
        self.grammar = grammar
        self.rows = rows
        self.consumed = [0] * len(rows)  # tokens each row's matcher consumed since this object was made

    def __len__(self) -> int:
        return len(self.rows)

    def fork(self, parents: Sequence[int]) -> "RowMatchers":
        return RowMatchers(self.grammar, [self.rows[p].deep_copy() if self.rows[p] is not None else None
                                          for p in parents])

    @staticmethod
    def concat(parts: Sequence["RowMatchers | None"], sizes: Sequence[int]) -> "RowMatchers | None":
        """The rows of several calls' states stacked (a call without a constraint: ``sizes[i]`` Nones).
        Calls of one backend may hold different constraints: each matcher carries its own grammar, the
        ``Grammar`` here only lends the vocabulary, the executor and the mask timer."""
        present = [p for p in parts if p is not None]
        if not present:
            return None
        out = RowMatchers(present[0].grammar, [])
        for part, n in zip(parts, sizes):
            out.rows += part.rows if part is not None else [None] * n
        out.consumed = [0] * len(out.rows)
        return out

    def slice(self, lo: int, hi: int) -> "RowMatchers | None":
        rows = self.rows[lo:hi]
        if all(m is None for m in rows):
            return None
        out = RowMatchers(self.grammar, rows)
        out.consumed = self.consumed[lo:hi]
        return out

    def advance(self, tokens: torch.Tensor, alive: torch.Tensor | None = None) -> None:
        """Feed ``tokens[i]`` to row i's matcher where ``alive[i]`` (an end-of-sequence token ends the
        row instead: it is not fed)."""
        toks = tokens.tolist()
        eos = self.grammar.eos
        ok = alive.tolist() if alive is not None else [True] * len(self.rows)
        for i, m in enumerate(self.rows):
            if m is None or not ok[i] or toks[i] in eos:
                continue
            if not m.consume_token(toks[i]):
                raise RuntimeError(f"internal error: token {toks[i]} was taken against the constraint "
                                   f"({' '.join(m.get_error().split())[:200]})")
            self.consumed[i] += 1

    def mask(self, logprobs: torch.Tensor, alive: torch.Tensor | None = None) -> torch.Tensor:
        """``logprobs`` (``[rows, vocab]``) with every token the row's matcher forbids at -inf,
        renormalised over the rest; rows without a live matcher unchanged.  A row whose matcher has
        stopped (the format is complete) may only end."""
        start = time.perf_counter()
        rows = [i for i, m in enumerate(self.rows) if m is not None and (alive is None or bool(alive[i]))]
        if not rows:
            return logprobs
        allowed = self.grammar.allowed([self.rows[i] for i in rows])
        if allowed.shape[1] != logprobs.shape[1]:  # a model whose head is wider than the tokenizer: never those
            keep = torch.zeros(len(rows), logprobs.shape[1], dtype=torch.bool)
            width = min(allowed.shape[1], logprobs.shape[1])
            keep[:, :width] = allowed[:, :width]
            allowed = keep
        if len(rows) == len(self.rows):  # the usual case: every row masked, no gather / scatter
            out = torch.log_softmax(logprobs.masked_fill(~allowed, float("-inf")), -1)
        else:
            index = torch.tensor(rows)
            out = logprobs.clone()
            out[index] = torch.log_softmax(logprobs[index].masked_fill(~allowed, float("-inf")), -1)
        self.grammar.mask_seconds += time.perf_counter() - start
        self.grammar.mask_rows += len(rows)
        return out

    def commit(self, rows: Sequence[int], keep: int) -> "RowMatchers":
        """The states of ``rows`` after the first ``keep`` tokens they took since the fork that made
        this object: a copy of each, rolled back by the tokens it consumed beyond ``keep``."""
        out = []
        for r in rows:
            m = self.rows[r]
            if m is None:
                out.append(None)
                continue
            m = m.deep_copy()
            back = self.consumed[r] - keep
            if back > 0 and not m.rollback(back):
                raise RuntimeError(f"internal error: the constraint's matcher could not roll back {back} tokens")
            out.append(m)
        return RowMatchers(self.grammar, out)


def grammar_for(backend: Any, constraint: Constraint) -> Grammar:
    """``constraint`` compiled for ``backend``'s tokenizer (a backend that cannot mask per row, e.g.
    a remote engine, refuses)."""
    if not getattr(backend, "supports_constraints", False):
        raise ConstraintError(f"{type(getattr(backend, 'inner', backend)).__name__} cannot apply a constraint's mask "
                              "per row (a remote engine takes no per-row mask); run constraints on a local model "
                              "(drop --engine-url)")
    owner = getattr(backend, "inner", backend)  # a lock-step view shares its backend's grammars
    cache: OrderedDict = owner.__dict__.setdefault("_grammars", OrderedDict())
    key = constraint.grammar_text
    with _LOCK:
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
    grammar = Grammar(constraint, backend.tokenizer, backend.vocab_size, sorted(backend.eos_ids))
    with _LOCK:
        cache[key] = grammar
        while len(cache) > GRAMMAR_CACHE:  # a server sees a new schema per request: keep the recent ones
            cache.popitem(last=False)
    return grammar


def attach(backend: Any, beam: Any, constraint: Constraint | None, constrained: Sequence[int] = (0,)) -> Any:
    """A freshly prefilled ``beam`` with fresh matchers on rows ``constrained`` and its next-token
    distributions masked (the other rows, e.g. the fluency context's, stay free)."""
    if constraint is None:
        return beam
    states = grammar_for(backend, constraint).start(len(beam), constrained)
    beam.constraint = states
    beam.next_logprobs = states.mask(beam.next_logprobs)
    return beam
