"""Reward functions for the search: the batched ``Reward`` interface, weighted sums, and cheap
rule-based rewards (keywords, length limits, regular expressions, banned words)."""

from .base import Reward, RewardError, RewardScores, WeightedSum, as_reward
from .programmatic import (
    banned,
    count_words,
    custom,
    from_options,
    keyword_coverage,
    keywords,
    keywords_found,
    max_tokens,
    max_words,
    min_tokens,
    min_words,
    must_match,
    must_not_match,
    normalize_keywords,
    regex,
    word_range,
)

__all__ = [
    "Reward",
    "RewardError",
    "RewardScores",
    "WeightedSum",
    "as_reward",
    "banned",
    "count_words",
    "custom",
    "from_options",
    "keyword_coverage",
    "keywords",
    "keywords_found",
    "max_tokens",
    "max_words",
    "min_tokens",
    "min_words",
    "must_match",
    "must_not_match",
    "normalize_keywords",
    "regex",
    "word_range",
]
