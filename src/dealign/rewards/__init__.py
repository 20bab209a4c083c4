"""Reward functions for the search: the batched ``Reward`` interface, weighted sums, cheap
rule-based rewards (keywords, length limits, regular expressions, banned words), model-based
rewards (reward models, classifiers, embeddings, lexicons, LM judges), learned rewards (trained heads on
frozen backbones, their ensembles), named rewards such as ``harmless`` and ``helpful``, and calibration onto
a common scale."""

from .base import Reward, RewardError, RewardScores, WeightedSum, as_reward
from .form import well_formed
from .classic import non_toxic, sentiment
from .classifier import sequence_classifier
from .embedding import embedding_similarity, relevance
from .judge import lm_judge
from .normalize import Calibration, calibrate, calibrated
from .registry import available, named_reward, reward_from_path
from .programmatic import (
    banned,
    count_words,
    custom,
    finish_with_keywords,
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
    "Calibration",
    "Reward",
    "RewardError",
    "RewardScores",
    "WeightedSum",
    "as_reward",
    "available",
    "calibrate",
    "calibrated",
    "embedding_similarity",
    "lm_judge",
    "named_reward",
    "non_toxic",
    "relevance",
    "reward_from_path",
    "sentiment",
    "sequence_classifier",
    "banned",
    "count_words",
    "custom",
    "finish_with_keywords",
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
    "well_formed",
]
