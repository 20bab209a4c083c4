"""The serial runner: every row on one aligner in this process, in input order."""

from __future__ import annotations

import json
import sys
from typing import IO, Any

from ..errors import UsageError
from .jobs import Job, answer


def run_serial(jobs: list[Job], done: int, out: IO[str], aligner: Any, source: str) -> None:
    """Answer ``jobs[done:]`` with ``aligner``, writing and flushing each row as soon as it is ready
    (so the output is always a resumable prefix).  A row the search refuses stops the run, naming
    ``source`` and the line."""
    from tqdm import tqdm

    with tqdm(total=len(jobs), initial=done, unit="row", file=sys.stderr, dynamic_ncols=True) as bar:
        for job in jobs[done:]:
            try:
                rec = answer(aligner, job)
            except ValueError as exc:
                raise UsageError(
                    f"{source} line {job.lineno}: {exc} (rows before it are saved; fix it and rerun with --resume)"
                ) from None
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            out.flush()
            bar.update()
