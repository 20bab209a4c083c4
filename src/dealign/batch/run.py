"""``run_batch``: a JSONL file of rows in, a JSONL file of answers out, resumable, on one process or
on Ray actors; both runners write the same rows in the same order."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

from ..backends.lockstep import check_batch_size
from ..errors import UsageError
from ..settings import Settings
from .jobs import read_jobs, rows_done
from .ray_runner import require_ray, run_sharded
from .serial import run_serial
from .spec import AlignerSpec


def run_batch(input: Path, output: Path, base: Settings, spec: AlignerSpec, *, resume: bool = False, workers: int = 1,
              build: Callable[[], Any] | None = None, batch_size: int = 1) -> int:
    """Answer every row of ``input`` into ``output`` with the aligner ``spec`` describes; returns the
    number of rows generated now.  ``workers > 1`` answers the rows on that many Ray actors, each
    building its own aligner from ``spec``, with the same output row for row.  ``build`` is how the
    serial runner gets its aligner (default ``spec.build``; ``dealign eval`` passes a memoised one so
    that its fluency judge can fall back on the same model).  ``batch_size``: rows searched at a time
    in lock-step on the one process (``Aligner.map_batched``) or in each Ray actor.  Nothing is loaded when every row is done."""
    if input.resolve() == output.resolve():
        raise UsageError("--output must be a different file from --input")
    jobs = read_jobs(input, base)
    done = rows_done(output, jobs) if resume else 0
    if done == len(jobs):
        print(f"all {done} rows of {input} are already in {output}; nothing to do", file=sys.stderr)
        return 0
    if done:
        print(f"resuming: {done} of {len(jobs)} rows already in {output}", file=sys.stderr)
    if workers < 1:
        raise UsageError(f"--workers must be >= 1; got {workers}")
    check_batch_size(batch_size)  # before the output is touched
    if workers > 1:
        require_ray()  # before the output is touched
    with open(output, "a" if done else "w", encoding="utf-8") as out:  # opened first: fail before the load
        if workers > 1:
            run_sharded(jobs, done, out, base, spec, workers, input.name, batch_size=batch_size)
        else:
            run_serial(jobs, done, out, (build or spec.build)(), input.name, batch_size)
    return len(jobs) - done
