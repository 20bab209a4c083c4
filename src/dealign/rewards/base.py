"""Rewards as plain batched functions, combined with weights.

A reward function has the shape ``f(prompts, completions, **context) -> list[float]``: one score per
completion, computed for the whole batch at once so that expensive scorers (a reward model, a
classifier) see every candidate of a search step in one call.  ``context`` carries per-text facts the
search knows and a reward may use, currently ``finished`` (``list[bool]``: the text ended with the
end-of-sequence token, so it is a complete answer rather than a prefix plus lookahead).

``Reward`` gives such a function a name; ``0.7 * a + 0.3 * b`` builds a ``WeightedSum`` whose
``score`` returns the total and the per-reward breakdown, scoring each distinct text once.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ..errors import RewardError

RewardFn = Callable[..., Sequence[float]]


def _accepted_context(fn: Callable) -> tuple[bool, frozenset[str]]:
    """Which context keywords ``fn`` can take: (accepts **kwargs, explicitly named parameters)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: pass nothing extra
        return False, frozenset()
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    named = frozenset(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
    return var_kw, named


class Reward:
    """A named, batched reward function.

    ``every_n_tokens`` and ``finished_only`` let a costly reward ask the search to call it less often:
    every n generated tokens, or only on finished texts (it scores 0 on the others).  ``upper_bound`` is
    the largest value the reward can return, if known; the search may use it to stop early.
    """

    def __init__(
        self,
        fn: RewardFn,
        name: str | None = None,
        *,
        every_n_tokens: int = 1,
        finished_only: bool = False,
        upper_bound: float | None = None,
    ) -> None:
        if not callable(fn):
            raise RewardError(f"a reward must be callable as f(prompts, completions), got {type(fn).__name__}")
        if every_n_tokens < 1:
            raise RewardError(f"every_n_tokens must be >= 1, got {every_n_tokens}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", None) or type(fn).__name__
        self.every_n_tokens = every_n_tokens
        self.finished_only = finished_only
        self.upper_bound = upper_bound
        self._var_kw, self._named = _accepted_context(fn)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **context: Any) -> list[float]:
        if len(prompts) != len(completions):
            raise RewardError(f"reward {self.name!r}: got {len(prompts)} prompts for {len(completions)} completions")
        extra = context if self._var_kw else {k: v for k, v in context.items() if k in self._named}
        try:
            out = self.fn(list(prompts), list(completions), **extra)
        except RewardError:
            raise
        except Exception as exc:  # a user's scorer failed: say which one
            raise RewardError(f"reward {self.name!r} raised {type(exc).__name__}: {exc}") from exc
        try:
            scores = [float(x) for x in out]
        except (TypeError, ValueError) as exc:
            raise RewardError(
                f"reward {self.name!r} must return a list of numbers, one per completion; got {out!r:.80}"
            ) from exc
        if len(scores) != len(completions):
            raise RewardError(
                f"reward {self.name!r} returned {len(scores)} scores for {len(completions)} completions; "
                "a reward must return one score per completion"
            )
        bad = [s for s in scores if not math.isfinite(s)]
        if bad:
            raise RewardError(f"reward {self.name!r} returned a non-finite score ({bad[0]}); return finite floats")
        return scores

    # weights -----------------------------------------------------------------------------------
    def __mul__(self, weight: float) -> "WeightedSum":
        return WeightedSum([(self, 1.0)]) * weight

    __rmul__ = __mul__

    def __add__(self, other: "Reward | WeightedSum") -> "WeightedSum":
        return WeightedSum([(self, 1.0)]) + other

    def __radd__(self, other: Any) -> "WeightedSum":
        if other == 0:  # lets sum([...]) work
            return WeightedSum([(self, 1.0)])
        return NotImplemented

    def __repr__(self) -> str:
        return f"Reward({self.name})"


@dataclass
class RewardScores:
    """Scores of one batch: the weighted total and each reward's raw (unweighted) scores."""

    total: list[float]
    parts: dict[str, list[float]] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)

    def row(self, i: int) -> dict[str, float]:
        return {name: vals[i] for name, vals in self.parts.items()}


class WeightedSum:
    """``sum(w_i * R_i)``: the heuristic the search maximises, with the breakdown kept per reward."""

    def __init__(self, terms: Sequence[tuple[Reward, float]] = ()) -> None:
        self.terms: list[tuple[Reward, float]] = []
        for reward, weight in terms:
            weight = float(weight)
            if not math.isfinite(weight):
                raise RewardError(f"weight of reward {reward.name!r} must be a finite number, got {weight}")
            self.terms.append((reward, weight))

    @property
    def names(self) -> list[str]:
        """Unique display names, in term order (a repeated name gets ``#2``, ``#3``)."""
        seen: dict[str, int] = {}
        out = []
        for reward, _ in self.terms:
            n = seen.get(reward.name, 0) + 1
            seen[reward.name] = n
            out.append(reward.name if n == 1 else f"{reward.name}#{n}")
        return out

    @property
    def upper_bound(self) -> float | None:
        """Largest possible total, when every term declares a bound (negative weights use 0 as a floor)."""
        total = 0.0
        for reward, weight in self.terms:
            if weight > 0:
                if reward.upper_bound is None:
                    return None
                total += weight * reward.upper_bound
        return total

    def __bool__(self) -> bool:
        return bool(self.terms)

    def __mul__(self, weight: float) -> "WeightedSum":
        if not isinstance(weight, (int, float)):
            return NotImplemented
        return WeightedSum([(r, w * weight) for r, w in self.terms])

    __rmul__ = __mul__

    def __add__(self, other: "Reward | WeightedSum") -> "WeightedSum":
        if isinstance(other, Reward):
            other = WeightedSum([(other, 1.0)])
        if not isinstance(other, WeightedSum):
            return NotImplemented
        return WeightedSum(self.terms + other.terms)

    def __radd__(self, other: Any) -> "WeightedSum":
        if other == 0:
            return self
        return NotImplemented

    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        *,
        finished: Sequence[bool] | None = None,
        num_tokens: Sequence[int] | None = None,
        prev_num_tokens: Sequence[int] | None = None,
    ) -> RewardScores:
        """Score a batch; each distinct (prompt, completion, finished) is passed to each reward once.

        ``num_tokens`` (generated tokens per text after this step) and ``prev_num_tokens`` (before it)
        let rewards with ``every_n_tokens > 1`` be skipped on steps that do not cross a multiple of n
        (finished texts are always scored); skipped texts score 0 for that step.
        """
        n = len(completions)
        if len(prompts) != n:
            raise RewardError(f"got {len(prompts)} prompts for {n} completions")
        fin = [False] * n if finished is None else [bool(f) for f in finished]
        keys = list(zip(prompts, completions, fin))
        uniq: dict[tuple[str, str, bool], int] = {}
        for key in keys:
            uniq.setdefault(key, len(uniq))
        u_prompts = [k[0] for k in uniq]
        u_texts = [k[1] for k in uniq]
        u_fin = [k[2] for k in uniq]
        where = [uniq[k] for k in keys]

        total = [0.0] * n
        parts: dict[str, list[float]] = {}
        weights: dict[str, float] = {}
        for (reward, weight), name in zip(self.terms, self.names):
            sel = list(range(len(u_texts)))
            if reward.finished_only:
                sel = [i for i in sel if u_fin[i]]
            if reward.every_n_tokens > 1 and num_tokens is not None:
                n_every = reward.every_n_tokens
                prev = prev_num_tokens if prev_num_tokens is not None else [t - 1 for t in num_tokens]
                due = {uniq[k] for k, t, p in zip(keys, num_tokens, prev) if t // n_every > p // n_every or k[2]}
                sel = [i for i in sel if i in due]
            u_scores = [0.0] * len(u_texts)
            if sel:
                got = reward([u_prompts[i] for i in sel], [u_texts[i] for i in sel], finished=[u_fin[i] for i in sel])
                for i, s in zip(sel, got):
                    u_scores[i] = s
            vals = [u_scores[j] for j in where]
            parts[name] = vals
            weights[name] = weight
            for i, v in enumerate(vals):
                total[i] += weight * v
        return RewardScores(total=total, parts=parts, weights=weights)

    def __repr__(self) -> str:
        return " + ".join(f"{w:g}*{name}" for (_, w), name in zip(self.terms, self.names)) or "0"


def as_reward(obj: Any) -> WeightedSum:
    """Accept what users naturally pass: None, a Reward, a WeightedSum, a plain callable, or a
    mapping/list of (reward, weight)."""
    if obj is None:
        return WeightedSum()
    if isinstance(obj, WeightedSum):
        return obj
    if isinstance(obj, Reward):
        return WeightedSum([(obj, 1.0)])
    if isinstance(obj, Mapping):
        return WeightedSum([(_as_single(r), w) for r, w in obj.items()])
    if isinstance(obj, (list, tuple)):
        if all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], (int, float)) for x in obj):
            return WeightedSum([(_as_single(r), w) for r, w in obj])  # [(reward, weight), ...]
        return sum((as_reward(x) for x in obj), WeightedSum())
    if callable(obj):
        return WeightedSum([(Reward(obj), 1.0)])
    raise RewardError(
        f"cannot use {type(obj).__name__} as a reward: pass a Reward, a callable f(prompts, completions), "
        "or a weighted sum such as 0.7 * keywords([...]) + 0.3 * max_words(20)"
    )


def _as_single(obj: Any) -> Reward:
    if isinstance(obj, Reward):
        return obj
    if callable(obj):
        return Reward(obj)
    raise RewardError(f"cannot use {type(obj).__name__} as a reward")
