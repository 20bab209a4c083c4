"""The Ray runner: ``dealign generate --input ... --workers N`` shards the rows across N actors.

Why it is built this way:

* **Actors, not tasks** — each actor loads its model once (``AlignerSpec.build``) and answers many rows;
  a task per row would reload the model every time.  Each actor pins torch to ``max(1, cpus // N)``
  threads so N actors do not oversubscribe the cores.
* **Rows travel as JSON, not as ``Job``s** — a ``Job`` holds a built reward, which may wrap a lazily
  loaded model or a closure; the actor rebuilds the job from the raw row and the base ``Settings``
  with the very code the single-process path uses, so each row gets the same search, reward and seed.
  Every search seeds its own generator from the row's ``seed``, so sampling strategies give the same
  answer whichever actor runs the row.
* **A reorder buffer keeps the output resumable** — rows finish out of order, but a row is written
  (and flushed) only once every earlier row is written, so the output is always a prefix of the
  single-process output and ``--resume`` (skip as many rows as the output holds) stays exact.  At
  most ``window`` rows are submitted past the first unwritten one, which bounds both the buffer and
  the work an interruption can lose.  Rows are handed out dynamically (at most two queued per
  actor), so a slow DeAL row does not leave the other actors idle behind a static shard.
* **``--batch-size`` batches inside each actor** — the actor is a threaded Ray actor with as many
  threads as rows in its batch; every row's search joins the actor's long-lived ``Lockstep``
  (``member`` / ``lane``), so an actor's rows share their forward passes step by step and a finished
  row's place goes to the next one queued to it (``batch_size + 1`` queued per actor).

Ray is imported only here, inside the functions, and only when ``--workers > 1``; ``--workers 1`` never
touches it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import IO, Any

from ..backends.lockstep import Lockstep
from ..errors import ModelLoadError, UsageError
from ..settings import Settings
from .jobs import Job, answer, make_job
from .spec import AlignerSpec

RAY_HINT = "pip install 'dealign[ray]'"
PER_ACTOR_QUEUE = 2  # one row running, one waiting: no idle round trip between rows


def require_ray():
    """Import Ray, or say how to install it (checked before the output file is touched)."""
    try:
        import ray
    except ImportError:
        raise ModelLoadError(f"--workers > 1 runs the rows on Ray, which is not installed; run `{RAY_HINT}`") from None
    return ray


class BatchWorker:
    """One Ray actor: a model loaded once, answering rows one at a time, or ``batch_size`` at a time
    in lock-step (its ``answer`` then runs in that many actor threads at once)."""

    def __init__(self, spec: AlignerSpec, base: Settings, threads: int, cwd: str, env: dict[str, str],
                 batch_size: int = 1):
        os.environ.update(env)  # DEALIGN_CACHE, DEALIGN_DATA, HF_*: as the driver sees them
        if os.path.isdir(cwd):
            os.chdir(cwd)  # relative paths in rows (reward_model) mean what they mean to the driver
        import torch

        torch.set_num_threads(threads)
        self.threads = threads
        self.spec, self.base, self.aligner = spec, base, None
        self.lock = Lockstep(batch_size) if batch_size > 1 else None
        if self.lock is not None:
            self.lock.serve()

    def load(self) -> tuple[str, str] | None:
        """Load the model; an error comes back as (kind, message) so the driver can report it cleanly."""
        try:
            self.aligner = self.spec.build()
        except ModelLoadError as exc:
            return "model", str(exc)
        except ValueError as exc:
            return "usage", str(exc)
        return None

    def shared(self) -> tuple[int, int]:
        """(steps run, steps that held more than one row's search) of this actor's lock-step batch."""
        return (self.lock.steps, self.lock.shared_steps) if self.lock is not None else (0, 0)

    def answer(self, index: int, lineno: int, row: dict[str, Any]) -> tuple[int, dict[str, Any] | None, Any]:
        """(index, output record, None), or (index, None, (kind, message)) for a row that failed the way
        the single-process path reports cleanly: the search refused it ("usage"), or a reward model
        could not be loaded ("model")."""
        try:
            job = make_job(lineno, row, self.base)
            if self.lock is None:
                rec = answer(self.aligner, job)
            else:
                import torch

                torch.set_num_threads(self.threads)  # per thread: Ray's actor threads start with torch's default
                with self.lock.member():
                    rec = answer(self.aligner.lane(self.lock), job)
        except ValueError as exc:
            return index, None, ("usage", str(exc))
        except ModelLoadError as exc:
            return index, None, ("model", str(exc))
        except OSError as exc:
            return index, None, ("model", f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
        return index, rec, None


def _last_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else type(exc).__name__


def _passed_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(("DEALIGN_", "HF_", "TRANSFORMERS_"))}


def run_sharded(jobs: list[Job], done: int, out: IO[str], base: Settings, spec: AlignerSpec, workers: int,
                source: str, window: int | None = None, batch_size: int = 1) -> None:
    """Answer ``jobs[done:]`` on ``workers`` Ray actors, ``batch_size`` rows at a time in each, writing
    ``out`` in input order (see the module docstring).  Uses the running Ray instance (``ray.init`` done by the caller, or ``RAY_ADDRESS``),
    else starts a local one for this run."""
    from tqdm import tqdm

    ray = require_ray()
    spec = spec.localized()
    spec.check()
    started = not ray.is_initialized()
    if started:
        print(f"starting Ray for {workers} workers ...", file=sys.stderr, flush=True)
        try:
            ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        except Exception as exc:  # noqa: BLE001 - Ray raises many kinds; the user needs the message
            raise ModelLoadError(f"could not start Ray for --workers: {type(exc).__name__}: {exc}") from None
    actors = []
    try:
        cpus = max(1, int(ray.cluster_resources().get("CPU", os.cpu_count() or 1)))
        threads = max(1, cpus // workers)
        # fractional CPUs when there are more workers than cores, so every actor is scheduled
        num_cpus = threads if workers <= cpus else cpus / workers
        Worker = ray.remote(BatchWorker).options(num_cpus=num_cpus, max_concurrency=batch_size)
        begin = time.perf_counter()
        print(f"loading model {spec.engine_url or spec.model or '(default)'} in {workers} workers "
              f"({threads} torch thread{'s' * (threads > 1)} each) ...", file=sys.stderr, flush=True)
        actors = [Worker.remote(spec, base, threads, os.getcwd(), _passed_env(), batch_size) for _ in range(workers)]
        try:
            failures = ray.get([a.load.remote() for a in actors])
        except ray.exceptions.RayError as exc:  # an actor could not even start
            raise ModelLoadError(f"a Ray worker failed to start: {_last_line(exc)}") from None
        for failure in failures:
            if failure is not None:
                kind, message = failure
                raise (UsageError if kind == "usage" else ModelLoadError)(message)
        print(f"workers ready in {time.perf_counter() - begin:.1f} s", file=sys.stderr, flush=True)
        with tqdm(total=len(jobs), initial=done, unit="row", file=sys.stderr, dynamic_ncols=True) as bar:
            _drive(ray, actors, jobs, done, out, bar, source, window or max(16, (8 + batch_size) * workers),
                   per_actor=PER_ACTOR_QUEUE + batch_size - 1)
        if batch_size > 1:
            counts = ray.get([a.shared.remote() for a in actors])
            print(f"lock-step: {sum(s for _, s in counts)} of {sum(n for n, _ in counts)} steps shared rows of "
                  f"several searches", file=sys.stderr, flush=True)
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()


def _drive(ray, actors: list, jobs: list, done: int, out: IO[str], bar, source: str, window: int,
           per_actor: int = PER_ACTOR_QUEUE) -> None:
    pending: dict[Any, int] = {}  # object ref -> actor number
    queued = [0] * len(actors)
    buffer: dict[int, dict[str, Any]] = {}  # finished rows waiting for an earlier one
    nxt, written = done, done  # next row to submit; next row to write
    failed: tuple[int, str, str] | None = None  # the earliest failed row: (index, kind, message)

    def submit() -> None:
        nonlocal nxt
        while failed is None and nxt < len(jobs) and nxt < written + window:
            a = min(range(len(actors)), key=queued.__getitem__)
            if queued[a] >= per_actor:
                return
            job = jobs[nxt]
            pending[actors[a].answer.remote(nxt, job.lineno, job.row)] = a
            queued[a] += 1
            nxt += 1

    submit()
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            queued[pending.pop(ref)] -= 1
            try:
                index, rec, error = ray.get(ref)
            except ray.exceptions.RayError as exc:  # a worker died (out of memory, killed)
                raise ModelLoadError(
                    f"a Ray worker failed: {_last_line(exc)} ({written} rows are saved; rerun with --resume)"
                ) from None
            bar.update()
            if error is not None:
                failed = min(failed or (index, *error), (index, *error))
            else:
                buffer[index] = rec
        while written in buffer and (failed is None or written < failed[0]):
            out.write(json.dumps(buffer.pop(written), ensure_ascii=False) + "\n")
            out.flush()
            written += 1
        submit()
    if failed is not None:
        index, kind, message = failed
        if kind == "model":
            raise ModelLoadError(f"{message} ({written} rows are saved; rerun with --resume)")
        raise UsageError(
            f"{source} line {jobs[index].lineno}: {message} (rows before it are saved; fix it and rerun with --resume)"
        )
