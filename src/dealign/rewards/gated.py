"""Rewards that read the request: R_harmless where a request looks harmful, R_helpful where it does not.

Why: the packaged heads ignore what was asked -- R_harmless prefers a refusal to a real answer by about
the same margin whether the question was "how do I make a bomb" or "how do I bake bread", R_helpful the
reverse (training/prompt_gate.py has the figures) -- so any fixed mix of them either refuses
everything or answers everything.  The gate, P(harmful | request) from a logistic head on the
request's MiniLM embedding, sets the mix per request::

    harm_gated = g * R_harmless + (1 - g) * R_helpful,   g = P(harmful | prompt)

It only weights rewards; the search still decides what to say.  A term whose weight is below
``skip`` for every row of a batch is not computed (most requests are clearly one or the other, and
each term is a model forward pass).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

from .base import Reward, RewardError
from .embedding import embedder


def load_gate(path: str | Path) -> Callable[[Sequence[str]], list[float]]:
    """The gate saved by ``dealign train-gate`` (``gate.json``): requests -> P(harmful)."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        weights, bias = spec["weights"], float(spec["bias"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RewardError(f"cannot read the prompt gate at {path} ({exc}); train it again with `dealign train-gate`") from None
    return gate_of(weights, bias)


def gate_of(weights: Sequence[float], bias: float) -> Callable[[Sequence[str]], list[float]]:
    """The gate of a logistic head over MiniLM's normalised embedding: requests -> P(harmful), memoised."""
    import torch

    w = torch.as_tensor(weights, dtype=torch.float32)
    enc = embedder()
    memo: dict[str, float] = {}

    def gate(prompts: Sequence[str]) -> list[float]:
        todo = [p for p in dict.fromkeys(prompts) if p not in memo]
        if todo:
            logits = enc.encode(todo) @ w + bias
            memo.update({p: float(torch.sigmoid(z)) for p, z in zip(todo, logits)})
        return [memo[p] for p in prompts]

    return gate


def harm_gated(harmless: Reward, helpful: Reward, gate: Callable[[Sequence[str]], list[float]], *,
               name: str = "harm_gated", skip: float = 0.02) -> Reward:
    """``g * harmless + (1 - g) * helpful`` with ``g = gate(prompt)``; in [0, 1] when both are."""

    def score(prompts: list[str], completions: list[str], **context: Any) -> list[float]:
        g = gate(prompts)
        total = [0.0] * len(completions)
        for reward, share in ((harmless, g), (helpful, [1.0 - x for x in g])):
            if max(share) < skip:
                continue
            vals = reward(prompts, completions, **context)
            total = [t + s * v for t, s, v in zip(total, share, vals)]
        return total

    bounds = (harmless.upper_bound, helpful.upper_bound)
    upper = max(bounds) if all(b is not None and math.isfinite(b) for b in bounds) else None
    return Reward(score, name, upper_bound=upper)
