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
from ..constraints import Constraint
from ..constraints.matcher import attach
from ..rewards.base import WeightedSum
from .config import Hypothesis, SearchConfig, SearchResult, SearchStats
from .deal import certain_prefix, deal_search
from .trace import TraceRecorder, sampled_steps


def _sample_rows(backend: Backend, prompt_ids, rows: int, cfg: SearchConfig, sampler: Sampler, on_commit=None,
                 constraint: Constraint | None = None):
    """``rows`` answers sampled from one prefill: ``[(tokens, logprob, finished, token_logprobs)]``,
    tokens up to and including the end-of-sequence token, ``token_logprobs`` a tensor of each one's.
    One batched rollout of ``max_new_tokens``; or, when
    ``on_commit`` is given, one token per step (same forward passes and random draws, so the same
    tokens) so that it sees the common prefix of the rows after every step and may abort by raising."""
    beam = attach(backend, backend.prefill(list(prompt_ids)), constraint)
    first = sampler.pick(beam.next_logprobs.expand(rows, -1))[:, None]
    if on_commit is None:
        ro = backend.rollout(beam, [0] * rows, first, cfg.max_new_tokens - 1, sampler=sampler)
        return [(ro.tokens[r, : ro.length[r]].tolist(), float(ro.logprobs[r, : ro.length[r]].sum()), ro.finished[r],
                 ro.logprobs[r, : ro.length[r]]) for r in range(rows)]
    tokens, logprobs = [first[:, 0]], [beam.next_logprobs[0].gather(0, first[:, 0])]
    length, done, parents = [cfg.max_new_tokens] * rows, [False] * rows, [0] * rows
    for step in range(cfg.max_new_tokens):
        for r, tok in enumerate(tokens[-1].tolist()):
            if not done[r] and tok in backend.eos_ids:
                length[r], done[r] = step + 1, True
        if all(done) or step == cfg.max_new_tokens - 1:
            break
        ro = backend.rollout(beam, parents, tokens[-1][:, None], 0)
        beam, parents = backend.commit(ro, list(range(rows)), 1), list(range(rows))
        so_far = torch.stack(tokens, 1).tolist()
        on_commit(certain_prefix([so_far[r] for r in range(rows) if not done[r]], []))
        tok = sampler.pick(beam.next_logprobs)
        tok_lp = beam.next_logprobs.gather(1, tok[:, None]).squeeze(1)
        finished = torch.tensor(done)
        tokens.append(torch.where(finished, torch.full_like(tok, min(backend.eos_ids)), tok))
        logprobs.append(torch.where(finished, torch.zeros_like(tok_lp), tok_lp))
    toks, lps = torch.stack(tokens, 1), torch.stack(logprobs, 1)
    return [(toks[r, : length[r]].tolist(), float(lps[r, : length[r]].sum()), done[r], lps[r, : length[r]])
            for r in range(rows)]


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
    on_commit=None,
    trace: TraceRecorder | None = None,
    constraint: Constraint | None = None,
) -> SearchResult:
    """Greedy (one row, temperature 0), sampling (one row) or best-of-N (N rows, reranked), every
    token drawn under ``constraint`` when given.  ``on_commit``: see :func:`_sample_rows`.  ``trace``
    records the chosen answer one token a step."""
    start, before = time.perf_counter(), backend.counters.snapshot()
    rows = cfg.n if cfg.strategy == "best-of-n" else 1
    if cfg.strategy == "greedy":
        sampler = Sampler()
    else:
        sampler = Sampler(cfg.temperature, cfg.top_p, torch.Generator().manual_seed(cfg.seed))
    sampled = _sample_rows(backend, prompt_ids, rows, cfg, sampler, on_commit, constraint)
    hyps = [Hypothesis(toks, lp, 0.0, {}, 0.0, fin, backend.decode(toks)) for toks, lp, fin, _ in sampled]
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
    stats = _finish_stats(backend, before, start, steps=max(len(h.token_ids) for h in hyps))
    stats.reward_calls, stats.candidates_scored = reward_calls, rows if reward else 0
    if trace is not None:
        sampled_steps(trace, best.token_ids, sampled[hyps.index(best)][3].tolist())
        trace.finish(best, stats)
    return SearchResult(best=best, beam=sorted(hyps, key=lambda h: -h.score), stats=stats)


def beam_search(backend: Backend, prompt_ids: Sequence[int], reward: WeightedSum, cfg: SearchConfig, *,
                prompt_text: str = "", on_commit=None, trace: TraceRecorder | None = None,
                constraint: Constraint | None = None) -> SearchResult:
    """Plain beam search on log-probability (under ``constraint`` when given); the reward is computed
    for reporting only."""
    cfg = cfg.replace(topk=cfg.beam, lookahead=0, mode="token", top_p=1.0, fluency=0.0, open_tokens=0)
    result = deal_search(backend, prompt_ids, WeightedSum(), cfg, prompt_text=prompt_text, lam=0.0, on_commit=on_commit,
                         trace=trace, constraint=constraint)
    if reward:
        hyps = [result.best, *result.beam]
        scores = reward.score([prompt_text] * len(hyps), [h.text for h in hyps], finished=[h.finished for h in hyps])
        for i, h in enumerate(hyps):
            h.reward, h.rewards = scores.total[i], scores.row(i)
        result.stats.reward_calls += 1
    return result
