"""Every error a user can cause, in one place, importing nothing of the package.

Two families, because callers report them differently (``dealign`` exits 2 for the first, 1 for the
second; the server answers 400 for the first): ``ValueError`` for bad input (a flag, a batch line, a
search setting, a reward) and ``RuntimeError`` for what the machine could not do (load a model, reach
an engine).  Each message is one line that says what was wrong and what to do.  The modules that
raise them re-export their own (``dealign.search.ConfigError``, ``dealign.rewards.RewardError``,
``dealign.models.ModelLoadError``, ...), so those imports keep working.
"""

from __future__ import annotations

from pathlib import Path


# bad input: ValueError -----------------------------------------------------------------------------
class UsageError(ValueError):
    """Bad command line, input file or request settings: reported as ``error: ...`` with exit code 2."""


class ResumeError(UsageError):
    """An existing output that cannot be continued; ``reason`` says why, for callers with their own advice."""

    def __init__(self, output: Path, reason: str) -> None:
        super().__init__(f"cannot resume: {output}: {reason}; use another --output or drop --resume to start over")
        self.reason = reason


class ConfigError(ValueError):
    """A search setting is out of range; the message names it and the allowed values."""


class RewardError(ValueError):
    """A reward was misconfigured or returned something that is not one finite score per text."""


# what could not be done: RuntimeError --------------------------------------------------------------
class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message says what was tried and what to do."""


class RemoteEngineError(ModelLoadError):
    """The engine is unreachable, refused a request or cannot serve what the search needs; the
    message says which and what to change."""


class JudgeUnavailable(ModelLoadError):
    """The parser behind the sentence judge is not installed."""


class MissingExtra(ModelLoadError):
    """An optional package a feature needs is not installed (the CLI reports it in one line)."""


__all__ = ["ConfigError", "JudgeUnavailable", "MissingExtra", "ModelLoadError", "RemoteEngineError", "ResumeError", "RewardError",
           "UsageError"]
