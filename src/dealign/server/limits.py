"""What the operator of ``dealign serve`` allows one request to cost, and how many may wait.

Every request is checked against these before it is queued (or, for the prompt length, when its turn
comes): a request over a limit gets a 400 naming the limit and the flag that sets it.  With at most
``max_batch`` searches running and ``queue_size`` waiting, the server's memory is bounded by
``(queue_size + max_batch)`` requests of at most these sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class ServerLimits:
    max_tokens: int = 256  # largest max_tokens a request may ask for (--max-tokens)
    # largest search width: beam*topk*max(1, lookahead) for DeAL (an opening step's states*open_topk*open_lookahead
    # if wider; the safe profile's is 4*8*2 = 64), beam*beam, n (--max-candidates)
    max_candidates: int = 64
    max_prompt_tokens: int = 2048  # prompt after the chat template and instruction (--max-prompt-tokens)
    timeout: float = 60.0  # seconds from arrival to answer, queue included (--timeout)
    queue_size: int = 16  # requests waiting while max_batch run; beyond: 429 (--queue-size)
    max_batch: int = 8  # requests searching together, batched step by step (--max-batch); 1: one at a time (see docs/serving.md)
    prefix_cache_mb: float = 64.0  # recent prompts' KV caches kept, so a shared opening is read once (--prefix-cache-mb; 0: off)
    max_body_bytes: int = 1_000_000  # request body (--max-body-bytes)
    max_connections: int = 64  # open connections; beyond: 503 from uvicorn (--max-connections)
    allow_regex: bool = True  # must_match / must_not_match run the client's regular expressions (--allow-regex)
    rewards: str = "all"  # named model rewards requests may use: all, none, or NAME,NAME (--rewards)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("allow_regex", "rewards"):
                continue
            minimum = 0 if f.name in ("queue_size", "prefix_cache_mb") else 1
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
                flag = "--" + f.name.replace("_", "-")
                raise ValueError(f"{flag} must be a number >= {minimum}; got {value!r}")

    def offered_rewards(self) -> list[str]:
        """The named rewards (``dealign.rewards.registry``) requests may ask for; each loads its model
        once, on first use, so memory grows by at most these models."""
        try:
            from ..rewards.registry import available
        except ImportError:  # a build without model rewards
            return []
        names = list(available())
        if self.rewards.strip().lower() == "all":
            return names
        if self.rewards.strip().lower() in ("", "none"):
            return []
        wanted = [w.strip().lower().replace("-", "_") for w in self.rewards.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise ValueError(f"--rewards: unknown named reward {unknown[0]!r}; known: {', '.join(names)}, or all / none")
        return wanted

    def width(self, cfg) -> int:
        """How wide a search is: the most tokens one step rolls out (what ``max_candidates`` bounds)."""
        if cfg.strategy == "deal":  # the wider of the opening's and the rest's steps
            opening = opening_states(cfg) * cfg.open_topk * max(1, cfg.open_lookahead)
            return max(cfg.beam * cfg.topk * max(1, cfg.lookahead), opening)
        if cfg.strategy == "beam":
            return cfg.beam * cfg.beam
        if cfg.strategy == "best-of-n":
            return cfg.n
        return 1


def opening_states(cfg) -> int:
    """The states of a DeAL opening's widest step, its last: step t has ``min(beam, open_topk ** t)``
    (one at the first step); 0 without an opening."""
    if not cfg.open_tokens:
        return 0
    states = 1
    for _ in range(cfg.open_tokens - 1):
        if states >= cfg.beam:
            break
        states *= cfg.open_topk
    return min(cfg.beam, states)
