"""Decoding strategies behind one entry point, ``run_search``."""

from __future__ import annotations

from typing import Any, Sequence

from ..backends.base import Backend
from ..rewards.base import WeightedSum, as_reward
from .baselines import beam_search, sampled_search
from .config import STRATEGIES, ConfigError, Hypothesis, SearchConfig, SearchResult, SearchStats
from .deal import deal_search


def run_search(
    backend: Backend,
    prompt_ids: Sequence[int],
    reward: WeightedSum | Any,
    cfg: SearchConfig,
    *,
    prompt_text: str = "",
    draft: Backend | None = None,
) -> SearchResult:
    """Decode one prompt with ``cfg.strategy``; ``reward`` is anything ``as_reward`` accepts."""
    reward = as_reward(reward)
    if cfg.strategy == "deal":
        return deal_search(backend, prompt_ids, reward, cfg, prompt_text=prompt_text, draft=draft)
    if cfg.strategy == "beam":
        return beam_search(backend, prompt_ids, reward, cfg, prompt_text=prompt_text)
    return sampled_search(backend, prompt_ids, reward, cfg, prompt_text=prompt_text)


__all__ = ["STRATEGIES", "ConfigError", "Hypothesis", "SearchConfig", "SearchResult", "SearchStats", "run_search"]
