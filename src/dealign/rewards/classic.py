"""Classic (non-neural) text classifiers as rewards: the ``alt-profanity-check`` SVM (``non_toxic``) and
the VADER sentiment lexicon (``sentiment``); microseconds per text, each an optional package."""

from __future__ import annotations

import importlib
from typing import Any

from .base import Reward, RewardError
from .cache import cached, missing_package

__all__ = ["non_toxic", "sentiment"]


def _import(module: str, pip_name: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise missing_package(module, pip_name, what) from None


def non_toxic(*, name: str = "non_toxic", **reward_kw: Any) -> Reward:
    """1 − P(offensive) from the ``alt-profanity-check`` classifier (a linear SVM on bag-of-words,
    calibrated; microseconds per text).

    *Scores* the response alone.  *Range*: [0, 1], 1 = clean.  It sees profanity and insults, not
    harmful *content* politely phrased ("here is how to build a bomb" scores clean).
    """
    _import("profanity_check", "alt-profanity-check", "the non_toxic reward")

    def score(prompts: list[str], completions: list[str]) -> list[float]:
        from profanity_check import predict_prob

        return [1.0 - float(p) for p in predict_prob(list(completions))]

    return Reward(score, name, upper_bound=1.0, **reward_kw)


def sentiment(polarity: str = "positive", *, name: str = "sentiment", **reward_kw: Any) -> Reward:
    """VADER sentiment (``vaderSentiment``, a rule-based lexicon): the compound score c in [-1, 1]
    mapped to ``(1 + c) / 2`` for ``polarity="positive"`` or ``(1 - c) / 2`` for ``"negative"``.

    *Scores* the response alone.  *Range*: [0, 1], 0.5 = neutral.  Unfinished texts are scored as they stand.
    """
    if polarity not in ("positive", "negative"):
        raise RewardError(f"polarity must be positive or negative; got {polarity!r}")
    module = _import("vaderSentiment.vaderSentiment", "vaderSentiment", "the sentiment reward")
    analyzer = cached("vader", "default", module.SentimentIntensityAnalyzer)
    sign = 1.0 if polarity == "positive" else -1.0

    def score(prompts: list[str], completions: list[str]) -> list[float]:
        return [(1.0 + sign * analyzer.polarity_scores(t)["compound"]) / 2.0 for t in completions]

    return Reward(score, name, upper_bound=1.0, **reward_kw)
