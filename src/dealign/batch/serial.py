"""The serial runner: every row on one aligner in this process, in input order."""

from __future__ import annotations

import json
import sys
from typing import IO, Any

from ..errors import UsageError
from .jobs import Job, answer


def run_serial(jobs: list[Job], done: int, out: IO[str], aligner: Any, source: str, batch_size: int = 1) -> None:
    """Answer ``jobs[done:]`` with ``aligner``, writing and flushing each row in input order as soon
    as it and the rows before it are ready (so the output is always a resumable prefix).  With
    ``batch_size`` > 1 that many rows are searched at a time in lock-step (``Aligner.map_batched``).
    A row the search refuses stops the run, naming ``source`` and the line."""
    from tqdm import tqdm

    with tqdm(total=len(jobs), initial=done, unit="row", file=sys.stderr, dynamic_ncols=True) as bar:
        answers = aligner.map_batched(answer, jobs[done:], batch_size=batch_size)
        try:
            for job, (rec, exc) in zip(jobs[done:], answers):
                if isinstance(exc, ValueError):
                    raise UsageError(
                        f"{source} line {job.lineno}: {exc} (rows before it are saved; fix it and rerun with --resume)"
                    ) from None
                if exc is not None:
                    raise exc
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                out.flush()
                bar.update()
        finally:
            answers.close()  # rows still searching are cancelled
