"""Batch jobs: one JSONL line in, checked and built; one output row out; resuming an output.

Every input line is parsed and checked (JSON, prompt, settings, reward) before any model is loaded,
so a typo on line 900 fails in a second instead of after an hour.  The runners (``serial``,
``ray_runner``) write each row as soon as it may be written, which is what makes resuming (skip as
many rows as the output already holds, ``rows_done``) safe after an interruption.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ResumeError, UsageError
from ..jsonl import json_lines
from ..rewards.base import WeightedSum
from ..search import SearchConfig
from ..settings import Settings, unknown_field_hints


@dataclass
class Job:
    """One input row, checked and ready to run."""

    lineno: int
    row: dict[str, Any]
    prompt: Any
    settings: Settings
    config: SearchConfig
    reward: WeightedSum


def _prompt_of(row: dict[str, Any]) -> Any:
    if "prompt" in row and "messages" in row:
        raise UsageError('give either "prompt" or "messages", not both')
    if "prompt" in row:
        if not isinstance(row["prompt"], str):
            raise UsageError(f'"prompt" must be a string, got {row["prompt"]!r:.60}')
        return row["prompt"]
    if "messages" in row:
        msgs = row["messages"]
        ok = isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
        )
        if not ok:
            raise UsageError('"messages" must be a non-empty list of {"role": ..., "content": ...} objects')
        return msgs
    raise UsageError('needs a "prompt" (text) or "messages" (chat list) field')


def make_job(lineno: int, row: dict[str, Any], base: Settings) -> Job:
    """One input row checked and built (prompt, settings, search config, reward); raises ValueError.
    The single-process path and the Ray workers build every row with this."""
    prompt = _prompt_of(row)
    settings = base.merged(row)
    return Job(lineno, row, prompt, settings, settings.config(), settings.build_reward())


def answer(aligner: Any, job: Job) -> dict[str, Any]:
    """Generate ``job``'s answer and return its output row.  Only the row's given search settings are
    passed, so the aligner's own defaults (segment mode for a remote engine) fill in the rest."""
    start = time.perf_counter()
    result = aligner.generate(job.prompt, reward=job.reward, trace=job.settings.output.get("trace", False),
                              **job.settings.search, **job.settings.prompt, **job.settings.constraint)
    return record(job, result, time.perf_counter() - start)


def read_jobs(path: Path, base: Settings) -> list[Job]:
    """Parse and check every row of ``path``; errors name the file and line number."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read the input file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"the input file {path} is not UTF-8 text") from None
    jobs = []
    for lineno, where, row in json_lines(lines, path.name, UsageError):
        if not isinstance(row, dict):
            raise UsageError(f"{where}: expected a JSON object, got {type(row).__name__}")
        try:
            job = make_job(lineno, row, base)
        except ValueError as exc:  # UsageError, ConfigError, RewardError, bad reward options
            raise UsageError(f"{where}: {exc}") from None
        for hint in unknown_field_hints(row):
            print(f"warning: {where}: {hint}", file=sys.stderr)
        jobs.append(job)
    if not jobs:
        raise UsageError(f"the input file {path} has no rows")
    return jobs


def rows_done(output: Path, jobs: list[Job]) -> int:
    """How many rows an existing output already holds (for --resume).  A last line cut off
    mid-write is dropped; an output that does not match the input is refused rather than mixed."""
    if not output.exists():
        return 0
    text = output.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    records = []
    for i, raw in enumerate(lines, 1):
        try:
            records.append(json.loads(raw))
        except json.JSONDecodeError:
            if i == len(lines) and not raw.endswith("\n"):  # interrupted while writing: redo that row
                output.write_text("".join(lines[:-1]), encoding="utf-8")
                break
            raise ResumeError(output, f"line {i} is not valid JSON") from None
    if len(records) > len(jobs):
        raise ResumeError(output, f"it has {len(records)} rows but the input only {len(jobs)}")
    for i, (rec, job) in enumerate(zip(records, jobs), 1):
        differs = [k for k in ("prompt", "messages") if not isinstance(rec, dict) or rec.get(k) != job.row.get(k)]
        differs = differs or [k for k, v in job.row.items() if k not in ANSWER_FIELDS and rec.get(k) != v]
        if differs:
            raise ResumeError(output, f"line {i} is not the answer to input line {job.lineno} (different {differs[0]!r})")
    return len(records)


# fields record() writes over the input row's (an input may carry e.g. its own "strategy")
ANSWER_FIELDS = frozenset({"text", "reward", "rewards", "tokens", "seconds", "finished", "strategy", "coverage", "stats"})


def record(job: Job, result: Any, seconds: float) -> dict[str, Any]:
    """The output row: the input row plus the answer, its reward and its cost."""
    out = dict(job.row)
    out.update(
        text=result.text,
        reward=result.reward,
        rewards=result.rewards,
        tokens=result.num_tokens,
        seconds=round(seconds, 4),
        finished=result.finished,
        strategy=result.strategy,
    )
    coverage = job.settings.coverage(result.text)
    if coverage is not None:
        out["coverage"] = coverage
    if isinstance(job.settings.prompt.get("instruction"), list):
        out["start"] = result.start  # which of the row's instructions the answer grew from
    out["stats"] = result.stats
    if getattr(result, "trace", None) is not None:
        out["trace"] = result.trace
    return out
