"""The small interface between the search and a model.

The search never touches tensors of a model or a KV cache: it asks a backend for

* ``prefill(ids)``: encode the prompt once and return a one-row ``Beam`` whose next-token
  distribution is known;
* ``rollout(beam, parents, forced, steps)``: fork the parent rows (a row may be used several times),
  feed the ``forced`` tokens of every row in one forward pass, then extend all rows together by
  ``steps`` tokens (greedy or sampled), one batched forward per token;
* ``prefill_many(prompts)`` (optional): several prompts as the rows of one beam, so that one forward
  advances rows of different prompts (the search's fluency context rides along with the prompt);
* ``commit(rollout, rows, keep)``: keep some rows of a rollout, each having consumed its first
  ``keep`` tokens, as the next beam, reusing what the rollout already computed.

A local transformers model implements this with a forked ``DynamicCache``; a remote serving engine
can implement the same three calls with token-id prompts and top-k log-probabilities.
"""

from __future__ import annotations

import copy

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass
class Beam:
    """Rows that share a prompt and have consumed the same number of tokens.

    ``next_logprobs[i]`` is the log-distribution of row i's next token (``[rows, vocab]``), so the
    search can pick actions without another forward pass.  ``state`` is backend-private.
    """

    ids: list[list[int]]
    next_logprobs: torch.Tensor
    state: Any = None
    # the rows' constraint states (``dealign.constraints.matcher.RowMatchers``) or None: a backend that
    # ``supports_constraints`` forks them with the rows, masks every distribution with them and commits them
    constraint: Any = None

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Rollout:
    """The outcome of extending rows: ``tokens[i]`` (forced then generated), their log-probs under
    the model that ran the rollout, and ``length[i]``: how many of them count (up to and including
    the first end-of-sequence token)."""

    parents: list[int]
    tokens: torch.Tensor  # [rows, n_forced + steps], long
    logprobs: torch.Tensor  # [rows, n_forced + steps], float
    length: list[int]
    finished: list[bool]
    n_fed: int  # how many tokens of each row went through the model (their KV entries exist)
    state: Any = None
    constraint: Any = None  # the rows' constraint states after their tokens (see ``Beam.constraint``)


@dataclass
class RolloutCall:
    """One ``Backend.rollout`` call, as data: what a lock-step group (``rollout_group``) runs together."""

    beam: Beam
    parents: list[int]
    forced: torch.Tensor
    steps: int
    sampler: "Sampler | None" = None
    feed_last: bool = False
    follow: Sequence[int] | None = None


@dataclass
class Prefill:
    """One ``prefill`` (``many`` False, one prompt) or ``prefill_many`` call, as data."""

    prompts: list[list[int]]
    many: bool = False


@dataclass
class Sampler:
    """How rollouts choose tokens: greedy (temperature 0) or sampling with temperature / top-p."""

    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def pick(self, logprobs: torch.Tensor) -> torch.Tensor:
        """One token per row from ``[rows, vocab]`` log-probs."""
        if self.temperature <= 0:
            return logprobs.argmax(dim=-1)
        scaled = logprobs / self.temperature
        if self.top_p < 1.0:
            scaled = top_p_mask(scaled, self.top_p)
        probs = torch.softmax(scaled, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


def top_p_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf every token outside the smallest set whose probability reaches ``top_p`` (the top
    token always stays)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


@dataclass
class Counters:
    """What the model was asked to do: sequential forward passes and tokens it processed, and the
    widest batch of one forward (``rows_max``: how the tests see that extra rows, e.g. the fluency
    context's, ride along in the same forward instead of costing passes of their own)."""

    forward_passes: int = 0
    tokens_processed: int = 0
    rows_max: int = 0

    def add(self, rows: int, width: int) -> None:
        self.forward_passes += 1
        self.tokens_processed += rows * width
        self.rows_max = max(self.rows_max, rows)

    def snapshot(self) -> dict:
        return {"forward_passes": self.forward_passes, "tokens_processed": self.tokens_processed}


def eos_ids_of(*sources: Any) -> set[int]:
    """The end-of-sequence ids named by ``sources``: each an id, a list of ids or None (a generation
    config's ``eos_token_id``, a tokenizer's), merged so every backend stops on the same tokens."""
    ids: set[int] = set()
    for source in sources:
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(x) for x in source)
    return ids


class Backend(ABC):
    """A model the search can drive.  See the module docstring for the contract."""

    eos_ids: frozenset[int]
    vocab_size: int
    counters: Counters
    # ``rollout_group`` stacks the rows of several calls in one forward pass (so batching searches in
    # lock-step pays); without it the calls of a group run one after another
    stacks_rows: bool = False
    # several searches may call it at once from their own threads (a remote engine batches them)
    thread_safe: bool = False

    def with_own_counters(self) -> "Backend":
        """The same backend, counting one search's work apart (for concurrent searches on a
        ``thread_safe`` backend: each reports its own forward passes / requests)."""
        other = copy.copy(self)
        other.counters = type(self.counters)()
        return other

    @abstractmethod
    def prefill(self, ids: Sequence[int]) -> Beam: ...

    def prefill_many(self, prompts: Sequence[Sequence[int]]) -> Beam:
        """A beam whose row i has consumed ``prompts[i]`` (lengths may differ)."""
        raise NotImplementedError(f"{type(self).__name__} cannot hold several prompts in one beam")

    @property
    def supports_constraints(self) -> bool:
        """Whether rollouts honour ``Beam.constraint`` (mask every token, fork and commit the states)."""
        return False

    @property
    def supports_follow(self) -> bool:
        """Whether ``prefill_many`` and ``rollout(follow=...)`` are implemented."""
        return type(self).prefill_many is not Backend.prefill_many

    @abstractmethod
    def rollout(
        self,
        beam: Beam,
        parents: Sequence[int],
        forced: torch.Tensor,
        steps: int,
        *,
        sampler: Sampler | None = None,
        feed_last: bool = False,
        follow: Sequence[int] | None = None,
    ) -> Rollout:
        """Fork ``beam`` rows ``parents``, force ``forced`` (``[rows, t]``, t >= 1), then generate
        ``steps`` tokens per row.  ``feed_last`` also runs the last generated token through the model
        so that a commit of the whole rollout knows the next distribution.  ``follow[i]`` (a row with
        ``follow[j] == j``) makes row i take row ``follow[i]``'s generated tokens instead of choosing
        its own, so its log-probs score the same text under its own prompt."""

    @abstractmethod
    def commit(self, rollout: Rollout, rows: Sequence[int], keep: int) -> Beam:
        """The beam made of ``rows`` of ``rollout`` (repeats allowed), each having consumed its first
        ``keep`` tokens (1 <= keep <= rollout.n_fed), so all rows of a beam have the same length."""

    def rollout_group(self, calls: Sequence[RolloutCall]) -> list[Rollout]:
        """The rollouts of several beams (several searches), each as ``rollout`` would return it.
        This default runs them one after another; a backend that can stack rows of different
        beams in one forward (``HFBackend``) runs them together, which is what batching buys."""
        return [self.rollout(c.beam, c.parents, c.forced, c.steps, sampler=c.sampler, feed_last=c.feed_last,
                             follow=c.follow) for c in calls]

    def prefill_group(self, calls: Sequence[Prefill]) -> list[Beam]:
        """The prefills of several searches, each as ``prefill`` / ``prefill_many`` would return it."""
        return [self.prefill_many(c.prompts) if c.many else self.prefill(c.prompts[0]) for c in calls]

    def peek(self, rollout: Rollout, rows: Sequence[int], keep: int) -> torch.Tensor:
        """The next-token log-distributions ``commit(rollout, rows, keep)`` would hold, without
        building its cache."""
        return self.commit(rollout, rows, keep).next_logprobs

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...
