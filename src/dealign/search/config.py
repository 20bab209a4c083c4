"""Search settings and results, shared by DeAL and the baselines."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from ..errors import ConfigError

STRATEGIES = ("deal", "greedy", "sample", "beam", "best-of-n")
Strategy = Literal["deal", "greedy", "sample", "beam", "best-of-n"]


@dataclass
class SearchConfig:
    """How to decode.  Fields that a strategy does not use are ignored by it.

    DeAL: at each step every beam state proposes its ``topk`` next tokens (optionally cut to
    ``top_p``); each candidate is extended by ``lookahead`` tokens (greedy, or sampled at
    ``rollout_temperature``); candidates are ranked by ``logP / len**length_penalty + lam * R`` and the
    best ``beam`` survive.  ``mode="token"`` commits one token per step (the paper); ``"segment"``
    commits the candidate together with its lookahead, trading alignment for speed.

    The opening schedule: with ``open_tokens > 0`` the first ``open_tokens`` generated tokens are
    searched in token mode with ``open_topk`` actions and ``open_lookahead`` rollout tokens, and the
    rest with ``topk`` / ``lookahead`` / ``mode``.  Why: what an answer *is* -- a refusal or an
    answer, on topic or not -- is decided in its first few tokens (SafeDecoding, arXiv 2402.08983),
    where a wide search reaches openings a narrow one never proposes ("I" was the 8th most likely
    first token of SmolLM2's "I'm sorry, ..." to a harmful request); searching the whole answer that
    wide costs 10-40x greedy, while a narrow or segment-mode search after a wide opening costs little.
    """

    strategy: Strategy = "deal"
    max_new_tokens: int = 64
    beam: int = 4
    topk: int = 4
    top_p: float = 1.0
    lookahead: int = 1
    lam: float = 20.0
    fluency: float = 0.0
    fluency_prompt: str = "Write one sentence."
    mode: Literal["token", "segment"] = "token"
    length_penalty: float = 0.0
    rollout_temperature: float = 0.0
    temperature: float = 1.0
    n: int = 8
    seed: int = 0
    early_stop: bool = True  # stop once no live state can beat the best finished answer (see deal._settled)
    open_tokens: int = 0  # the opening schedule: 0 = off (see the class docstring)
    open_topk: int = 8
    open_lookahead: int = 2

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)}; got {self.strategy!r}")
        need(self.mode in ("token", "segment"), f"mode must be 'token' or 'segment'; got {self.mode!r}")
        for name in ("max_new_tokens", "beam", "topk", "n", "open_topk"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 1, f"{name} must be an integer >= 1; got {v!r}")
        need(isinstance(self.lookahead, int) and self.lookahead >= 0, f"lookahead must be an integer >= 0; got {self.lookahead!r}")
        for name in ("open_tokens", "open_lookahead"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 0, f"{name} must be an integer >= 0; got {v!r}")
        need(self.open_tokens <= self.max_new_tokens,
             f"the opening schedule does not fit the token budget: open_tokens {self.open_tokens} > max_new_tokens "
             f"{self.max_new_tokens}; lower open_tokens (0 turns the opening off) or raise max_new_tokens")
        need(not (self.open_tokens and self.mode == "segment" and self.fluency),
             "an opening schedule before segment mode needs fluency 0 (the fluency context is read differently in "
             "the two modes); set fluency 0, mode token, or open_tokens 0")
        need(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1]; got {self.top_p}")
        need(self.temperature > 0, f"temperature must be > 0 (use strategy 'greedy' for temperature 0); got {self.temperature}")
        need(self.rollout_temperature >= 0, f"rollout_temperature must be >= 0; got {self.rollout_temperature}")
        need(self.lam >= 0, f"lam (the reward weight) must be >= 0; got {self.lam}")
        need(isinstance(self.fluency, (int, float)) and not isinstance(self.fluency, bool) and math.isfinite(self.fluency)
             and self.fluency >= 0, f"fluency (the weight of the answer's log-prob in a neutral context) must be a number >= 0; got {self.fluency!r}")
        need(isinstance(self.fluency_prompt, str) and self.fluency_prompt.strip() != "",
             f"fluency_prompt must be a non-empty string (the neutral request the answer is read after); got {self.fluency_prompt!r}")
        need(self.length_penalty >= 0, f"length_penalty must be >= 0; got {self.length_penalty}")

    def replace(self, **changes) -> "SearchConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SearchStats:
    """What a search cost: sequential forward passes are what its wall time is made of."""

    steps: int = 0
    forward_passes: int = 0
    tokens_processed: int = 0
    candidates_scored: int = 0
    reward_calls: int = 0
    seconds: float = 0.0
    draft_forward_passes: int = 0


@dataclass
class Hypothesis:
    """One state of the search: generated tokens, their log-probability, reward and score."""

    token_ids: list[int]
    logprob: float
    reward: float
    rewards: dict[str, float]
    score: float
    finished: bool
    text: str = ""
    fluency: float = 0.0  # log-prob of the tokens in the neutral context (0 when the search does not read it)
    start: int = 0  # which start state the answer grew from (DeAL with several; 0 otherwise)


@dataclass
class SearchResult:
    """The chosen answer plus what the search saw: the final beam, the cost and, when asked, the trace
    of every step (``search/trace.py``)."""

    best: Hypothesis
    beam: list[Hypothesis] = field(default_factory=list)
    stats: SearchStats = field(default_factory=SearchStats)
    trace: dict | None = None
