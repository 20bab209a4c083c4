"""The baselines DeAL is compared with, on the same backend contract: greedy, sampling, beam search
and best-of-N reranked by the reward.

Greedy and sampling are one rollout of ``max_new_tokens``; best-of-N samples its N answers as N rows
of one batched rollout from a single prefill; beam search is DeAL with no reward and no lookahead
(top-``beam`` of each row contains the top-``beam`` of all rows' continuations, so it is exact).
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from ..backends.base import Backend, Sampler
from ..rewards.base import WeightedSum
from .config import Hypothesis, SearchConfig, SearchResult, SearchStats
from .deal import deal_search


def _sample_rows(backend: Backend, prompt_ids, rows: int, cfg: SearchConfig, sampler: Sampler):
    beam = backend.prefill(list(prompt_ids))
    first = sampler.pick(beam.next_logprobs.expand(rows, -1))[:, None]
    return backend.rollout(beam, [0] * rows, first, cfg.max_new_tokens - 1, sampler=sampler)


def _finish_stats(backend: Backend, before: dict, start: float, steps: int) -> SearchStats:
    after = backend.counters.snapshot()
    return SearchStats(
        steps=steps,
        forward_passes=after["forward_passes"] - before["forward_passes"],
        tokens_processed=after["tokens_processed"] - before["tokens_processed"],
        seconds=time.perf_counter() - start,
    )


def sampled_search(
    backend: Backend,
    prompt_ids: Sequence[int],
    reward: WeightedSum,
    cfg: SearchConfig,
    *,
    prompt_text: str = "",
) -> SearchResult:
    """Greedy (one row, temperature 0), sampling (one row) or best-of-N (N rows, reranked)."""
    start, before = time.perf_counter(), backend.counters.snapshot()
    rows = cfg.n if cfg.strategy == "best-of-n" else 1
    if cfg.strategy == "greedy":
        sampler = Sampler()
    else:
        sampler = Sampler(cfg.temperature, cfg.top_p, torch.Generator().manual_seed(cfg.seed))
    ro = _sample_rows(backend, prompt_ids, rows, cfg, sampler)
    hyps = []
    for r in range(rows):
        toks = ro.tokens[r, : ro.length[r]].tolist()
        hyps.append(Hypothesis(toks, float(ro.logprobs[r, : ro.length[r]].sum()), 0.0, {}, 0.0, ro.finished[r],
                               backend.decode(toks)))
    reward_calls = 0
    if reward:
        scores = reward.score([prompt_text] * rows, [h.text for h in hyps], finished=[h.finished for h in hyps])
        reward_calls = 1
        for i, h in enumerate(hyps):
            h.reward, h.rewards = scores.total[i], scores.row(i)
    for h in hyps:
        h.score = h.reward if cfg.strategy == "best-of-n" else h.logprob
    # best-of-N: a finished answer beats a fragment cut at the budget, then the higher reward, then
    # the likelier text; the first sample wins exact ties.
    best = max(hyps, key=lambda h: (h.finished, h.reward, h.logprob)) if rows > 1 else hyps[0]
    stats = _finish_stats(backend, before, start, steps=max(ro.length))
    stats.reward_calls, stats.candidates_scored = reward_calls, rows if reward else 0
    return SearchResult(best=best, beam=sorted(hyps, key=lambda h: -h.score), stats=stats)


def beam_search(
    backend: Backend, prompt_ids: Sequence[int], reward: WeightedSum, cfg: SearchConfig, *, prompt_text: str = ""
) -> SearchResult:
    """Plain beam search on log-probability; the reward is computed for reporting only."""
    cfg = cfg.replace(topk=cfg.beam, lookahead=0, mode="token", top_p=1.0)
    result = deal_search(backend, prompt_ids, WeightedSum(), cfg, prompt_text=prompt_text, lam=0.0)
    if reward:
        hyps = [result.best, *result.beam]
        scores = reward.score([prompt_text] * len(hyps), [h.text for h in hyps], finished=[h.finished for h in hyps])
        for i, h in enumerate(hyps):
            h.reward, h.rewards = scores.total[i], scores.row(i)
        result.stats.reward_calls += 1
    return result
