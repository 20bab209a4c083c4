"""Lock-step batching: many searches, one forward pass per step for all of them.

Why: a search pays for sequential forward passes, not rows (one cached SmolLM2 step costs 39 ms at
1 row and 68 ms at 16 on 2 CPU cores; on a GPU rows are free into the hundreds), yet every search
runs one prompt.  Rewriting each strategy as a batched state machine would fork the search code;
instead every search runs unchanged, each in its own thread, against a ``SharedBackend`` view.  A
view's forward-bearing calls (prefill, rollout) are queued; once *every* running search waits on
one, the queued calls are grouped (same backend, same kind, same forced width) and each
group runs as one ``rollout_group`` / ``prefill_group`` on the real backend, whose rows stack the
searches' rows.  Commits, peeks and decoding stay in the searches' threads.  A model reward's forward
passes join the same way: a search's thread in the batch (``dealign.joint.joining``) hands its
``joint`` calls -- an embedder's encode, a backbone's features -- to the step, and the calls of
every search with the same key run as one batch (``join``), so reward batches grow with the batch.

So each search sees exactly the calls it would make alone, with the numbers of its own rows (up to
float noise from padding), and its own sampler and seed: its answer is its one-at-a-time answer.
A search that finishes leaves; the next item starts at once and joins at the next step
(continuous batching), so the batch stays full.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Iterator, Sequence

import torch

from ..errors import UsageError
from .base import Backend, Beam, Counters, Prefill, Rollout, RolloutCall, Sampler
from .cpu_threads import serial_thread


def check_batch_size(n: Any) -> None:
    """A one-line error for a batch size that is not an integer >= 1 (callers check before any
    output is written)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UsageError(f"batch size must be an integer >= 1; got {n!r}")


class Cancelled(RuntimeError):
    """The lock-step run was closed while this search waited (its consumer stopped reading)."""


@dataclass(eq=False)
class JointCall:
    """A batched function's rows (``dealign.joint``): joined with the same key's other calls."""

    key: Hashable
    fn: Callable[[list], Sequence[Any]]
    rows: list


@dataclass(eq=False)
class _Call:
    view: "SharedBackend | None"  # None: a joint call (it uses no backend)
    request: Prefill | RolloutCall | JointCall
    result: Any = None
    error: BaseException | None = None
    done: bool = False

    def key(self) -> tuple:
        r = self.request
        if isinstance(r, JointCall):
            return ("joint", r.key)
        if isinstance(r, Prefill):
            return (id(self.view.inner), "prefill")
        return (id(self.view.inner), "rollout", int(r.forced.shape[1]))


class Lockstep:
    """Runs callables that use ``SharedBackend`` views, up to ``width`` at a time, their backend
    calls batched step by step; see the module docstring."""

    def __init__(self, width: int) -> None:
        check_batch_size(width)
        self.width = width
        self._cv = threading.Condition()
        self._pending: list[_Call] = []
        self._running = 0
        self._closed = False
        self.steps = 0  # groups run (each one set of forward passes)
        self.shared_steps = 0  # groups that held the calls of more than one search
        self.rows_max = 0  # the widest stacked group

    def view(self, backend: Backend) -> "SharedBackend":
        """A per-search handle on ``backend`` whose forwards join the others' (one per search:
        its counters are that search's)."""
        return SharedBackend(backend, self)

    # the searches' side ---------------------------------------------------------------------------
    def join(self, key: Hashable, fn: Callable[[list], Sequence[Any]], rows: list) -> Sequence[Any]:
        """``fn(rows)`` run at the next step, in one call with the rows of every search that joins
        ``key`` there (the ``dealign.joint.Joiner`` of a search's thread in this batch)."""
        return self.submit(None, JointCall(key, fn, list(rows)))

    def submit(self, view: "SharedBackend | None", request: Prefill | RolloutCall | JointCall) -> Any:
        call = _Call(view, request)
        with self._cv:
            if self._closed:
                raise Cancelled("the batch was closed")
            self._pending.append(call)
            self._cv.notify_all()
            while not call.done:
                self._cv.wait()
        if call.error is not None:
            raise call.error
        return call.result

    @contextmanager
    def member(self) -> Iterator[None]:
        """Count the calling thread among the running searches while the block runs (``serve``
        mode: a server's request threads join and leave as requests come and go)."""
        with self._cv:
            if self._closed:
                raise Cancelled("the batch was closed")
            self._running += 1
        serial_thread()  # the driver runs this search's forwards: its own torch ops stay off the cores
        try:
            yield
        finally:
            with self._cv:
                self._running -= 1
                self._cv.notify_all()

    def serve(self) -> threading.Thread:
        """Start a driver thread that runs each step once every member waits on a call, until
        ``close``; for searches that arrive at any time (``member``), e.g. a server's requests."""
        def drive() -> None:
            while True:
                with self._cv:
                    while not self._closed and not self._step_ready():
                        self._cv.wait()
                    if self._closed:
                        return
                    batch = self._take_step()
                self._execute(batch)

        thread = threading.Thread(target=drive, daemon=True, name="dealign-lockstep-driver")
        thread.start()
        return thread

    def close(self) -> None:
        """Fail every waiting call and every later one with ``Cancelled``; the driver stops."""
        with self._cv:
            self._closed = True
            for call in self._pending:
                call.error, call.done = Cancelled("the batch was closed"), True
            self._pending = []
            self._cv.notify_all()

    # the driver's side ----------------------------------------------------------------------------
    def map(self, tasks: Iterable[Callable[[], Any]]) -> Iterator[tuple[Any, BaseException | None]]:
        """Run ``tasks`` (each builds its own views), yielding ``(result, error)`` in input order
        as soon as each is ready and all before it have been yielded.  Closing the iterator early
        cancels the searches still running."""
        it = iter(tasks)
        exhausted = False
        results: dict[int, tuple[Any, BaseException | None]] = {}
        started = emitted = 0

        def run(i: int, task: Callable[[], Any]) -> None:
            try:
                serial_thread()  # this thread runs this search's forwards: its own torch ops stay off the cores
                out = (task(), None)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer in order
                out = (None, exc)
            with self._cv:
                results[i] = out
                self._running -= 1
                self._cv.notify_all()

        try:
            while True:
                with self._cv:
                    while True:
                        while not exhausted and self._running < self.width:
                            task = next(it, None)
                            if task is None:
                                exhausted = True
                                break
                            self._running += 1
                            threading.Thread(target=run, args=(started, task), daemon=True,
                                             name=f"dealign-lockstep-{started}").start()
                            started += 1
                        if emitted in results or self._running == 0 or self._step_ready():
                            break
                        self._cv.wait()
                    ready = []
                    while emitted in results:
                        ready.append(results.pop(emitted))
                        emitted += 1
                yield from ready
                with self._cv:  # only after the yield: a consumer that closes there leaves no step taken
                    batch = self._take_step() if self._step_ready() else []
                if batch:
                    self._execute(batch)
                elif self._running == 0 and exhausted and emitted == started:
                    return
        finally:
            self.close()

    def _step_ready(self) -> bool:
        """Under the lock: every running search waits on a call, so the step can run."""
        return bool(self._running) and len(self._pending) >= self._running

    def _take_step(self) -> list[_Call]:
        batch, self._pending = self._pending, []
        return batch

    def _execute(self, batch: Sequence[_Call]) -> None:
        groups: dict[tuple, list[_Call]] = {}
        for call in batch:
            groups.setdefault(call.key(), []).append(call)
        for calls in groups.values():
            if isinstance(calls[0].request, JointCall):
                self._execute_joint(calls)
                continue
            inner = calls[0].view.inner
            before = inner.counters.snapshot()
            try:
                reqs = [c.request for c in calls]
                outs = inner.prefill_group(reqs) if isinstance(reqs[0], Prefill) else inner.rollout_group(reqs)
                errors: list[BaseException | None] = [None] * len(calls)
            except BaseException as exc:  # noqa: BLE001 - every search of the group gets it
                outs, errors = [None] * len(calls), [exc] * len(calls)
            after = inner.counters.snapshot()
            rows = [_rows(c.request) for c in calls]
            total = max(sum(rows), 1)
            self.steps += 1
            self.shared_steps += len(calls) > 1
            self.rows_max = max(self.rows_max, total)
            for c, out, err, n in zip(calls, outs, errors, rows):
                c.view.counters.forward_passes += after["forward_passes"] - before["forward_passes"]
                c.view.counters.tokens_processed += (after["tokens_processed"] - before["tokens_processed"]) * n // total
                c.view.counters.rows_max = max(c.view.counters.rows_max, total)
                c.result, c.error = out, err
        with self._cv:
            for c in batch:
                c.done = True
            self._cv.notify_all()

    def _execute_joint(self, calls: Sequence[_Call]) -> None:
        """One call of the group's function over every search's rows, each search given its slice;
        if it fails, each search's rows again alone, so an error reaches only the search it is about."""
        rows = [r for c in calls for r in c.request.rows]
        try:
            out = calls[0].request.fn(rows)
            if len(out) != len(rows):
                raise ValueError(f"a joint call returned {len(out)} values for {len(rows)} rows")
        except BaseException as exc:  # noqa: BLE001 - handed to its search, or retried one search at a time
            if len(calls) == 1:
                calls[0].error = exc
                return
            for c in calls:
                try:
                    c.result = c.request.fn(c.request.rows)
                except BaseException as one:  # noqa: BLE001 - handed to its search
                    c.error = one
            return
        at = 0
        for c in calls:
            n = len(c.request.rows)
            c.result, at = out[at : at + n], at + n


def _rows(request: Prefill | RolloutCall) -> int:
    return len(request.prompts) if isinstance(request, Prefill) else len(request.parents)


@dataclass(eq=False)
class SharedBackend(Backend):
    """One search's view of a backend shared in lock-step (``Lockstep.view``): prefills and
    rollouts wait for the step, everything else goes straight to the real backend.  ``counters``
    counts the forward passes this search's rows rode in and its share of the tokens."""

    inner: Backend
    lockstep: Lockstep
    counters: Counters = field(default_factory=Counters)

    def __getattr__(self, name: str) -> Any:  # name, tokenizer, check_search, ... of the real backend
        if name in ("inner", "lockstep"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def eos_ids(self) -> frozenset[int]:  # type: ignore[override]
        return self.inner.eos_ids

    @property
    def vocab_size(self) -> int:  # type: ignore[override]
        return self.inner.vocab_size

    @property
    def supports_follow(self) -> bool:
        return self.inner.supports_follow

    @property
    def supports_constraints(self) -> bool:
        return self.inner.supports_constraints

    def prefill(self, ids: Sequence[int]) -> Beam:
        if len(ids) == 0:
            raise ValueError("the prompt encodes to no tokens; give a non-empty prompt")
        return self.lockstep.submit(self, Prefill([list(ids)]))

    def prefill_many(self, prompts: Sequence[Sequence[int]]) -> Beam:
        if not prompts or any(len(ids) == 0 for ids in prompts):
            raise ValueError("every prompt must encode to at least one token")
        return self.lockstep.submit(self, Prefill([list(ids) for ids in prompts], many=True))

    def rollout(self, beam: Beam, parents: Sequence[int], forced: torch.Tensor, steps: int, *,
                sampler: Sampler | None = None, feed_last: bool = False, follow: Sequence[int] | None = None) -> Rollout:
        return self.lockstep.submit(self, RolloutCall(beam, list(parents), forced, steps, sampler, feed_last, follow))

    def commit(self, rollout: Rollout, rows: Sequence[int], keep: int) -> Beam:
        return self.inner.commit(rollout, rows, keep)

    def peek(self, rollout: Rollout, rows: Sequence[int], keep: int) -> torch.Tensor:
        return self.inner.peek(rollout, rows, keep)

    def decode(self, ids: Sequence[int]) -> str:
        return self.inner.decode(ids)
