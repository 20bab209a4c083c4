"""Decoding strategies behind one entry point, ``run_search``."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ..backends.base import Backend
from ..constraints import Constraint
from ..rewards.base import WeightedSum, as_reward
from .baselines import beam_search, sampled_search
from .config import STRATEGIES, ConfigError, Hypothesis, SearchConfig, SearchResult, SearchStats
from .deal import deal_search
from .trace import TraceRecorder


def run_search(
    backend: Backend,
    prompt_ids: Sequence[int],
    reward: WeightedSum | Any,
    cfg: SearchConfig,
    *,
    prompt_text: str = "",
    draft: Backend | None = None,
    on_commit: Callable[[list[int]], None] | None = None,
    fluency_ids: Sequence[int] | None = None,
    trace: TraceRecorder | None = None,
    constraint: Constraint | None = None,
    starts: Sequence[Sequence[int]] = (),
) -> SearchResult:
    """Decode one prompt with ``cfg.strategy``; ``reward`` is anything ``as_reward`` accepts.

    ``on_commit(ids)``, if given, is called after every step with the tokens the answer is now sure
    to start with (they only grow; for best-of-n, the samples' common prefix); raising from it aborts
    the search.  Streaming and time limits are built on it.  ``fluency_ids``: DeAL's neutral context
    (see ``deal_search``), needed when ``cfg.fluency > 0``.  ``trace``: a ``TraceRecorder`` that
    records the search step by step (``search/trace.py``; the answer is the same with or without).
    ``constraint`` (``dealign.constraints``): a format every strategy keeps as a hard mask (see
    ``deal_search``).  ``starts``: more start states DeAL searches together with ``prompt_ids`` (see
    ``deal_search``); the other strategies take one."""
    reward = as_reward(reward)
    if starts and cfg.strategy != "deal":
        raise ConfigError(f"several start states (instructions) are searched together by strategy 'deal' only; "
                          f"{cfg.strategy!r} reads one: give one instruction")
    result = _run(backend, prompt_ids, reward, cfg, prompt_text=prompt_text, draft=draft, on_commit=on_commit,
                  fluency_ids=fluency_ids, trace=trace, constraint=constraint, starts=starts)
    if trace is not None:
        result.trace = trace.doc()
    return result


def _run(backend, prompt_ids, reward, cfg, *, prompt_text, draft, on_commit, fluency_ids, trace, constraint,
         starts) -> SearchResult:
    if cfg.strategy == "deal":
        return deal_search(backend, prompt_ids, reward, cfg, prompt_text=prompt_text, draft=draft, on_commit=on_commit,
                           fluency_ids=fluency_ids, trace=trace, constraint=constraint, starts=starts)
    if cfg.strategy == "beam":
        return beam_search(backend, prompt_ids, reward, cfg, prompt_text=prompt_text, on_commit=on_commit, trace=trace,
                           constraint=constraint)
    return sampled_search(backend, prompt_ids, reward, cfg, prompt_text=prompt_text, on_commit=on_commit, trace=trace,
                          constraint=constraint)


__all__ = ["STRATEGIES", "ConfigError", "Hypothesis", "SearchConfig", "SearchResult", "SearchStats", "TraceRecorder", "run_search"]
