"""Putting rewards on a common scale, so that ``0.5 * harmless + 0.5 * helpful`` means what it says.

Raw rewards live on different scales: a reward model's logit may range over ±5, a cosine similarity
over 0.1–0.6, a probability over [0, 1] but bunched near 0.9.  A weighted sum of raw scores is then
dominated by whichever spreads widest.  A :class:`Calibration` is fitted once on a *reference set*
(texts like the ones the search will score, e.g. the responses of a preference data set) and maps raw
scores to a shared scale:

- ``"quantile"`` (default): the empirical CDF of the reference scores, in [0, 1].  0.7 means "better
  than 70 % of the reference responses", whatever the reward; a weighted sum of quantile-calibrated
  rewards is a weighted mean of percentiles.  Beyond the reference range the score is clamped to 0 or
  1, linearly interpolated between reference quantiles (so it stays monotone and gives the search a
  gradient almost everywhere).
- ``"zscore"``: ``(x - mean) / std`` of the reference scores; unbounded, keeps the tails' spread.

A calibration is a small JSON-able dict, saved next to a trained reward model (its ``calibration``
entry) so the reward loads back already on that scale.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import RewardError
from .base import Reward

METHODS = ("quantile", "zscore")
_POINTS = 101  # quantiles kept: 0 %, 1 %, ..., 100 %


@dataclass
class Calibration:
    """A monotone map from a reward's raw scores to a common scale, fitted on reference scores."""

    method: str = "quantile"
    mean: float = 0.0
    std: float = 1.0
    quantiles: list[float] = field(default_factory=list)  # raw score at 0 %, 1 %, ..., 100 %
    n: int = 0
    reference: str = ""  # what the reference set was (documentation only)

    @classmethod
    def fit(cls, scores: Sequence[float], method: str = "quantile", reference: str = "") -> "Calibration":
        if method not in METHODS:
            raise RewardError(f"calibration method must be one of {', '.join(METHODS)}; got {method!r}")
        vals = sorted(float(s) for s in scores)
        if len(vals) < 2 or not all(math.isfinite(v) for v in vals):
            raise RewardError("a calibration needs at least two finite reference scores")
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        qs = [_quantile(vals, i / (_POINTS - 1)) for i in range(_POINTS)]
        return cls(method, mean, std if std > 0 else 1.0, qs, len(vals), reference)

    def __call__(self, x: float) -> float:
        if self.method == "zscore":
            return (x - self.mean) / self.std
        qs = self.quantiles
        if x <= qs[0]:
            return 0.0
        if x >= qs[-1]:
            return 1.0
        left, right = bisect.bisect_left(qs, x), bisect.bisect_right(qs, x)
        if left < right:  # x equals one or more quantiles (a plateau of ties): the middle of them
            return (left + right - 1) / 2 / (_POINTS - 1)
        frac = (x - qs[left - 1]) / (qs[left] - qs[left - 1])  # qs[left-1] < x < qs[left]
        return (left - 1 + frac) / (_POINTS - 1)

    @property
    def upper_bound(self) -> float | None:
        return 1.0 if self.method == "quantile" else None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "mean": self.mean, "std": self.std, "quantiles": self.quantiles,
                "n": self.n, "reference": self.reference}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Calibration":
        try:
            cal = cls(str(d["method"]), float(d["mean"]), float(d["std"]), [float(q) for q in d.get("quantiles", [])],
                      int(d.get("n", 0)), str(d.get("reference", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise RewardError(f"not a calibration: {exc}") from None
        if cal.method not in METHODS or (cal.method == "quantile" and len(cal.quantiles) < 2):
            raise RewardError(f"not a usable calibration (method {cal.method!r}, {len(cal.quantiles)} quantiles)")
        return cal

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def _quantile(sorted_vals: list[float], q: float) -> float:
    pos = q * (len(sorted_vals) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (pos - lo) * (sorted_vals[hi] - sorted_vals[lo])


def calibrated(reward: Reward, calibration: Calibration, name: str | None = None) -> Reward:
    """``reward`` with its scores passed through ``calibration`` (same name, ``every_n_tokens`` and
    ``finished_only``; the upper bound becomes 1 for quantile calibration)."""

    def score(prompts: list[str], completions: list[str], **context: Any) -> list[float]:
        return [calibration(x) for x in reward(prompts, completions, **context)]

    return Reward(score, name or reward.name, every_n_tokens=reward.every_n_tokens,
                  finished_only=reward.finished_only, upper_bound=calibration.upper_bound)


def calibrate(
    reward: Reward,
    prompts: Sequence[str],
    completions: Sequence[str],
    method: str = "quantile",
    reference: str = "",
) -> tuple[Reward, Calibration]:
    """Score the reference set ``(prompts, completions)`` with ``reward``, fit a :class:`Calibration`
    and return the calibrated reward together with it (save the calibration to reuse it)::

        helpful_q, cal = calibrate(relevance(), prompts, answers)   # now in [0, 1], a percentile
        reward = 0.5 * harmless_q + 0.5 * helpful_q
    """
    if len(prompts) != len(completions):
        raise RewardError(f"got {len(prompts)} reference prompts for {len(completions)} completions")
    cal = Calibration.fit(reward(list(prompts), list(completions), finished=[True] * len(prompts)), method, reference)
    return calibrated(reward, cal), cal
