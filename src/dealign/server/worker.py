"""Up to ``max_batch`` searches at a time, batched step by step, behind a bounded queue.

Each running request has a worker thread (a ``ThreadPoolExecutor`` of ``max_batch``), and their
searches advance in lock-step (``backends/lockstep.py``): a driver thread runs one forward pass per
step for the rows of every running search, so a request that arrives while others search joins the
running batch at the next step instead of waiting for them to end, and one that finishes, times out
or is cancelled simply leaves it.  The event loop only parses requests and writes responses.  At
most ``queue_size`` requests wait behind the running ones; the next gets a 429 at once.  A request's
time limit counts from its arrival: one still queued at its deadline is answered 503 and skipped by
the worker; one running is stopped at the next search step through the search's ``on_commit`` hook,
which is also how streamed text and stop sequences are produced (from the tokens the search has
made certain) and how a client that went away stops its search.

With a remote engine (a ``thread_safe`` backend that does not stack rows) the searches run side by
side instead, each on its own ``Aligner.fork``, and the engine's own batching does the rest.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from ..backends.lockstep import Lockstep
from ..rewards.base import WeightedSum
from ..search import SearchConfig
from ..search.trace import from_events
from .limits import ServerLimits
from .schemas import ApiError


@dataclass(eq=False)  # hashed by identity: the worker keeps a set of its jobs
class Job:
    """One request's search, as the worker runs it."""

    prompt: str | list[dict[str, str]]
    search: SearchConfig
    reward: WeightedSum
    prompt_options: dict[str, Any]
    stop: list[str]
    deadline: float  # time.monotonic()
    coverage: Callable[[str], float | None] | None = None
    trace: bool = False  # record the search (alignment.trace): streamed as events, else in the alignment report
    cancelled: threading.Event = field(default_factory=threading.Event)
    constraint: Any = None  # the answer's hard format (dealign.constraints), from response_format / alignment


@dataclass
class Outcome:
    """What a finished job answers: the text (cut at a stop sequence), why it ended, the token
    counts, the reward breakdown and search statistics; ``tail`` is the text not yet streamed."""

    text: str
    tail: str
    finish_reason: str  # "stop" (end of sequence or a stop sequence) | "length"
    prompt_tokens: int
    completion_tokens: int
    alignment: dict[str, Any]


class _Abort(Exception):
    """Raised from the search hook: the client went away or its time is up."""


class _StopSequence(Exception):
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids


class CommittedText:
    """Turns the growing certain prefix of token ids into text deltas that are safe to send: never an
    incomplete character (a trailing U+FFFD), never trailing whitespace (a tokenizer's clean-up may
    drop it once the next token is known), never the start of a stop sequence, nothing after one."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str]) -> None:
        self.decode, self.stops = decode, stops
        self.sent = ""
        self.stopped = False
        self._hold = max((len(s) for s in stops), default=1) - 1

    def _cut(self, text: str) -> tuple[str, bool]:
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return (text[: min(hits)], True) if hits else (text, False)

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def update(self, ids: list[int]) -> str:
        text, self.stopped = self._cut(self.decode(ids))
        if not self.stopped:
            text = text.rstrip("\ufffd").rstrip()
            text = text[: max(len(text) - self._hold, 0)]
        return self._advance(text)

    def finish(self, text: str) -> tuple[str, str, bool]:
        """The final answer cut at a stop sequence, the part of it not sent yet, whether it was cut."""
        text, stopped = self._cut(text)
        return text, self._advance(text), stopped


class Worker:
    """The server's search worker: up to ``limits.max_batch`` ``Job``s searching together, the rest
    queued (not a serving engine: those are the remote backend's, ``backends/remote.py``; with one,
    the searches run concurrently, each on ``Aligner.fork``, and the engine batches their requests)."""

    def __init__(self, aligner: Any, limits: ServerLimits) -> None:
        if hasattr(aligner, "with_prefix_cache"):  # a shared opening (chat template, instruction) is read once
            aligner = aligner.with_prefix_cache(limits.prefix_cache_mb)
        self.aligner, self.limits = aligner, limits
        import torch

        # an aligner that cannot hand out lanes (a wrapper of one) searches one request at a time
        self.batch = limits.max_batch if hasattr(aligner, "lane") else 1
        backend = getattr(aligner, "backend", None)
        # a remote engine batches concurrent requests itself: its searches run side by side, each
        # with its own counters; a local model's share forward passes in lock-step
        self._concurrent = self.batch > 1 and getattr(backend, "thread_safe", False) and not backend.stacks_rows
        lockstep = self.batch > 1 and not self._concurrent
        # a search thread that computes its own forwards gets all the cores; in lock-step the driver
        # computes them and ``Lockstep.member`` keeps the thread's own torch ops on one core
        init = None if lockstep else functools.partial(torch.set_num_threads, torch.get_num_threads())
        self._executor = ThreadPoolExecutor(max_workers=self.batch, thread_name_prefix="dealign-search",
                                            initializer=init)
        self._lock: Lockstep | None = None
        if lockstep:
            self._lock = Lockstep(self.batch)
            self._lock.serve()
        self.in_flight = 0  # running + waiting; touched only on the event loop
        self._jobs: set[Job] = set()
        self.completed = 0
        self.refused = 0

    def status(self) -> dict[str, Any]:
        batch = self.batch
        out: dict[str, Any] = {"running": min(self.in_flight, batch), "waiting": max(self.in_flight - batch, 0),
                               "max_batch": batch, "shared_steps": self._lock.shared_steps if self._lock else 0,
                               "queue_size": self.limits.queue_size, "completed": self.completed,
                               "refused_busy": self.refused}
        prefixes = getattr(getattr(self.aligner, "backend", None), "prefixes", None)
        if prefixes is not None:  # a local model's prompt-prefix cache (backends/prefix_cache.py)
            out["prefix_cache"] = {"hits": prefixes.hits, "misses": prefixes.misses,
                                   "tokens_saved": prefixes.tokens_saved, "mib": round(prefixes.nbytes / 2**20, 1)}
        return out

    def submit(self, job: Job, emit: Callable[[str | dict], None] | None = None) -> asyncio.Future:
        """Queue ``job``; ``emit(text)`` is called from the worker with each streamed delta, and
        ``emit(event)`` with each trace event (a dict, ``search/trace.py``) when the job asks for its
        trace.  Raises a 429 ``ApiError`` when the queue is full."""
        batch = self.batch
        if self.in_flight >= self.limits.queue_size + batch:
            self.refused += 1
            raise ApiError(429, f"the server is busy: {batch} requests are running (--max-batch) and "
                                f"{self.in_flight - batch} are waiting "
                                f"(the most it queues, set by --queue-size); retry shortly",
                           type="server_busy", code="queue_full", headers={"Retry-After": "1"})
        self.in_flight += 1
        self._jobs.add(job)
        fut = asyncio.get_running_loop().run_in_executor(self._executor, self._run, job, emit)
        fut.add_done_callback(lambda _: self._finished(job))
        return fut

    def _finished(self, job: Job) -> None:
        self.in_flight -= 1
        self.completed += 1
        self._jobs.discard(job)

    def shutdown(self) -> None:
        """Stop: queued jobs are dropped, the running search stops at its next step."""
        for job in list(self._jobs):
            job.cancelled.set()
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._lock is not None:
            self._lock.close()

    def timeout_error(self) -> ApiError:
        return ApiError(503, f"the request ran past this server's time limit ({self.limits.timeout:g} s from "
                             "arrival, queue included; set by --timeout); ask for fewer tokens or a smaller search, "
                             "or retry when the server is less busy", type="timeout", code="timeout")

    def check_prompt(self, job: Job) -> tuple[list[int], str]:
        """A 400 for a prompt that cannot be answered (empty, or longer than ``--max-prompt-tokens``).
        The handler calls it before a stream starts, so such a request gets an HTTP error, not a 200
        whose only event is an error; the worker calls it again for jobs submitted directly.  Returns
        the prompt's token ids and the user's text that the rewards see."""
        try:
            starts, user_text = self.aligner.encode_starts(job.prompt, **job.prompt_options)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="prompt") from None
        ids, longest = starts[0], max(len(start) for start in starts)  # several instructions: the longest counts
        if longest > self.limits.max_prompt_tokens:
            raise ApiError(400, f"the prompt is {longest} tokens (after the chat template), more than this server "
                                f"allows ({self.limits.max_prompt_tokens}, set by --max-prompt-tokens)",
                           param="prompt", code="limit_exceeded")
        return ids, user_text

    # the worker thread ---------------------------------------------------------------------------
    def _run(self, job: Job, emit: Callable[[str], None] | None) -> Outcome | None:
        if job.cancelled.is_set():
            return None
        if time.monotonic() > job.deadline:
            raise self.timeout_error()
        if self._concurrent:
            return self._search(job, emit, self.aligner.fork())
        if self._lock is None:
            return self._search(job, emit, self.aligner)
        with self._lock.member():
            return self._search(job, emit, self.aligner.lane(self._lock))

    def _search(self, job: Job, emit: Callable[[str], None] | None, aligner: Any) -> Outcome | None:
        ids, user_text = self.check_prompt(job)
        text = CommittedText(aligner.backend.decode, job.stop)
        steps = 0

        def on_commit(committed: list[int]) -> None:
            nonlocal steps
            steps += 1
            if job.cancelled.is_set() or time.monotonic() > job.deadline:
                raise _Abort()
            delta = text.update(committed)
            if delta and emit is not None:
                emit(delta)
            if text.stopped:
                raise _StopSequence(committed)

        events: list[dict] = []  # the trace's parts, for a report that is not streamed

        def on_trace(event: dict) -> None:
            if emit is not None:
                emit(event)
            else:
                events.append(event)

        start, before = time.perf_counter(), aligner.backend.counters.snapshot()
        try:
            result = aligner.generate(job.prompt, reward=job.reward, search=job.search, on_commit=on_commit,
                                      trace=on_trace if job.trace else False, constraint=job.constraint,
                                      **job.prompt_options)
        except _Abort:
            if job.cancelled.is_set():
                return None
            raise self.timeout_error() from None
        except _StopSequence as stop:  # the answer is settled up to a stop sequence: no need to search on
            after = aligner.backend.counters.snapshot()
            stats = {"steps": steps, "forward_passes": after["forward_passes"] - before["forward_passes"],
                     "tokens_processed": after["tokens_processed"] - before["tokens_processed"],
                     "seconds": time.perf_counter() - start}
            scores = job.reward.score([user_text], [text.sent], finished=[True]) if job.reward else None
            info = {"finished": True, "reward": scores.total[0] if scores else 0.0,
                    "rewards": scores.row(0) if scores else {}, "stats": stats}
            if job.trace and emit is None:
                info["trace"] = from_events(events)
            return self._outcome(job, text.sent, "", "stop_sequence", len(ids), len(stop.ids), info)
        except ValueError as exc:  # a reward that rejects its input, a bad setting found late
            raise ApiError(400, str(exc)) from None
        final, tail, cut = text.finish(result.text)
        info = {"finished": result.finished, "reward": result.reward, "rewards": result.rewards,
                "logprob": result.logprob, "score": result.score, "stats": result.stats}
        if isinstance(job.prompt_options.get("instruction"), list):  # several start states: which one answered
            info["start"] = result.start
        if job.trace and emit is None:
            info["trace"] = result.trace
        stopped_by = "stop_sequence" if cut else "end_of_sequence" if result.finished else "max_tokens"
        return self._outcome(job, final, tail, stopped_by, result.prompt_tokens, result.num_tokens, info)

    def _outcome(self, job: Job, text: str, tail: str, stopped_by: str, n_prompt: int, n_out: int,
                 info: dict) -> Outcome:
        alignment = {"strategy": job.search.strategy, **info, "stopped_by": stopped_by, "search": job.search.to_dict()}
        coverage = job.coverage(text) if job.coverage else None
        if coverage is not None:
            alignment["coverage"] = coverage
        reason = "length" if stopped_by == "max_tokens" else "stop"
        return Outcome(text, tail, reason, n_prompt, n_out, alignment)
