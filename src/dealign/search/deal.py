"""DeAL: decoding as a heuristic-guided search (Huang et al., 2024).

One step: every live state proposes its top-k next tokens (actions); every candidate is extended by a
lookahead rollout; the text ``prefix + candidate + lookahead`` is scored by the reward; candidates are
ranked by ``logP(committed tokens | prompt) / len**length_penalty + lam * R`` and the best ``beam``
survive.  Finished states stay in the beam and compete on the same score until better states push
them out; the answer is the best finished state.

Speed comes from the backend contract: the prompt is prefilled once, all candidates of a step are
rolled out together (one forward per lookahead token, whatever the number of candidates), and the
winners keep the rollout's cache, so a step never recomputes what an earlier one did.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..backends.base import Backend, Beam, Sampler
from ..rewards.base import WeightedSum
from .config import Hypothesis, SearchConfig, SearchResult, SearchStats


def propose(next_logprobs: torch.Tensor, topk: int, top_p: float = 1.0) -> list[list[tuple[int, float]]]:
    """The actions of each row: its ``topk`` most likely tokens, cut to the smallest set reaching
    ``top_p`` (the most likely token always stays); best first, ties by token id."""
    k = min(topk, next_logprobs.shape[-1])
    vals, idx = next_logprobs.topk(k, dim=-1, sorted=True)
    out = []
    for v_row, i_row in zip(vals.tolist(), idx.tolist()):
        acts, mass = [], 0.0
        for v, i in zip(v_row, i_row):
            if acts and mass >= top_p:
                break
            acts.append((i, v))
            mass += float(torch.tensor(v).exp())
        out.append(acts)
    return out


def normalised(logprob: float, n_tokens: int, length_penalty: float) -> float:
    return logprob / (max(n_tokens, 1) ** length_penalty) if length_penalty else logprob


@dataclass
class _State:
    tokens: list[int]
    logprob: float
    reward: float = 0.0
    rewards: dict | None = None
    hyp: Hypothesis | None = None  # set once finished


class _Models:
    """The policy alone, or the policy plus a cheaper lookahead model (the paper's LLM1/LLM2) that
    shares its tokenizer.  Hides which model ran the rollout from the search loop."""

    def __init__(self, policy: Backend, draft: Backend | None) -> None:
        self.policy, self.draft = policy, draft

    def prefill(self, ids: list[int]) -> tuple[Beam, Beam | None]:
        return self.policy.prefill(ids), (self.draft.prefill(ids) if self.draft else None)

    def expand(self, beams, parents, cands, steps, segment, sampler):
        """Roll out candidates; returns (tokens, logprobs under the policy, lengths, finished, handle)."""
        pbeam, dbeam = beams
        forced = torch.tensor(cands, dtype=torch.long)[:, None]
        if self.draft is None:
            ro = self.policy.rollout(pbeam, parents, forced, steps, sampler=sampler, feed_last=segment)
            return ro.tokens, ro.logprobs, ro.length, ro.finished, (ro, None)
        dro = self.draft.rollout(dbeam, parents, forced, steps, sampler=sampler, feed_last=segment)
        if not segment:  # token mode: only the candidate is committed, its log-prob is the policy's
            lp = dro.logprobs.clone()
            lp[:, 0] = pbeam.next_logprobs[torch.tensor(parents)].gather(1, forced).squeeze(1)
            return dro.tokens, lp, dro.length, dro.finished, (None, dro)
        # segment mode: the committed chunk is scored by the policy in one forward pass
        pro = self.policy.rollout(pbeam, parents, dro.tokens, 0)
        return dro.tokens, pro.logprobs, dro.length, dro.finished, (pro, dro)

    def commit(self, beams, handle, rows, keep, segment, cands, parents):
        pro, dro = handle
        if self.draft is None:
            return self.policy.commit(pro, rows, keep), None
        if segment:
            return self.policy.commit(pro, rows, keep), self.draft.commit(dro, rows, keep)
        forced = torch.tensor([[cands[r]] for r in rows], dtype=torch.long)
        pro = self.policy.rollout(beams[0], [parents[r] for r in rows], forced, 0)
        return self.policy.commit(pro, list(range(len(rows))), 1), self.draft.commit(dro, rows, keep)


def deal_search(
    policy: Backend,
    prompt_ids: Sequence[int],
    reward: WeightedSum,
    cfg: SearchConfig,
    *,
    prompt_text: str = "",
    draft: Backend | None = None,
    lam: float | None = None,
    on_commit: Callable[[list[int]], None] | None = None,
) -> SearchResult:
    """Run DeAL for one prompt.  ``lam`` overrides ``cfg.lam`` (beam search is DeAL with lam 0).

    ``on_commit(ids)``, if given, is called after every step that the search goes on from with the
    tokens every possible answer now starts with (see :func:`certain_prefix`; it only grows); it may
    raise to abort the search (a server's time limit, a client gone)."""
    lam = cfg.lam if lam is None else lam
    start = time.perf_counter()
    before = policy.counters.snapshot()
    d_before = draft.counters.forward_passes if draft else 0
    models = _Models(policy, draft)
    gen = torch.Generator().manual_seed(cfg.seed)
    sampler = Sampler(temperature=cfg.rollout_temperature, generator=gen)
    segment = cfg.mode == "segment"
    stats = SearchStats()

    beams = models.prefill(list(prompt_ids))
    live: list[_State] = [_State([], 0.0)]  # rows of the current beams, in order
    kept: list[_State] = []  # finished states still in the beam
    finished_all: list[Hypothesis] = []
    last_pool: list[tuple[float, _State]] = []

    while live:
        remaining = cfg.max_new_tokens - len(live[0].tokens)
        if remaining <= 0:
            break
        actions = propose(beams[0].next_logprobs, cfg.topk, cfg.top_p)
        parents, cands, cand_lp = [], [], []
        for row, acts in enumerate(actions):
            for tok, lp in acts:
                parents.append(row)
                cands.append(tok)
                cand_lp.append(lp)
        steps = min(cfg.lookahead, remaining - 1)
        tokens, logprobs, length, fin, handle = models.expand(beams, parents, cands, steps, segment, sampler)
        tokens_l, logprobs_l = tokens.tolist(), logprobs.tolist()

        texts, commits = [], []
        for j, p in enumerate(parents):
            prefix = live[p].tokens
            span = tokens_l[j][: length[j]]
            texts.append(policy.decode(prefix + span))
            if segment:
                committed = span
                lp = live[p].logprob + sum(logprobs_l[j][: length[j]])
            else:
                committed = span[:1]
                lp = live[p].logprob + cand_lp[j]
            commits.append((prefix + committed, lp, committed[-1] in policy.eos_ids))
        scores = reward.score(
            [prompt_text] * len(texts),
            texts,
            finished=fin,
            num_tokens=[len(c[0]) for c in commits],
            prev_num_tokens=[len(live[p].tokens) for p in parents],
        ) if reward else None
        stats.reward_calls += 1 if reward else 0
        stats.candidates_scored += len(texts)

        pool: list[tuple[float, _State, int]] = [(s.hyp.score, s, -1) for s in kept]
        for j, (toks, lp, done) in enumerate(commits):
            r = scores.total[j] if scores else 0.0
            score = normalised(lp, len(toks), cfg.length_penalty) + lam * r
            st = _State(toks, lp, r, scores.row(j) if scores else {})
            if done:
                st.hyp = Hypothesis(toks, lp, r, st.rewards, score, True, texts[j])
                finished_all.append(st.hyp)
            pool.append((score, st, j))
        pool.sort(key=lambda x: -x[0])  # stable: ties keep proposal order
        top = pool[: cfg.beam]
        last_pool = [(s, st) for s, st, _ in top]
        stats.steps += 1

        kept = [st for _, st, _ in top if st.hyp is not None]
        winners = [(st, j) for _, st, j in top if st.hyp is None]
        if not winners or (cfg.early_stop and _settled(finished_all, winners, reward, lam, cfg, top[0][1])):
            live = []
            break
        if on_commit is not None:
            on_commit(certain_prefix([st.tokens for st, _ in winners], finished_all))
        rows = [j for _, j in winners]
        keep = len(winners[0][0].tokens) - len(live[0].tokens)
        beams = models.commit(beams, handle, rows, keep, segment, cands, parents)
        live = [st for st, _ in winners]

    # the answer: the best finished state; otherwise the best state the search reached
    if finished_all:
        best = max(finished_all, key=lambda h: h.score)  # max keeps the first of equal scores
    else:
        best = _unfinished(policy, reward, prompt_text, last_pool, cfg, lam)
    beam_out = [st.hyp if st.hyp else _as_hyp(policy, st, s) for s, st in last_pool]
    for h in [best, *beam_out]:
        if not h.text:
            h.text = policy.decode(h.token_ids)

    after = policy.counters.snapshot()
    stats.forward_passes = after["forward_passes"] - before["forward_passes"]
    stats.tokens_processed = after["tokens_processed"] - before["tokens_processed"]
    stats.draft_forward_passes = (draft.counters.forward_passes - d_before) if draft else 0
    stats.seconds = time.perf_counter() - start
    return SearchResult(best=best, beam=beam_out, stats=stats)


def certain_prefix(live: list[list[int]], finished: list[Hypothesis]) -> list[int]:
    """The tokens that the answer will start with, whatever the search does next: the common prefix
    of the live states and the best finished answer so far.  The answer is the best finished state
    (a later one must beat this one, and descends from a live state) or, if none finishes, a
    descendant of a live state; so the prefix never shrinks from one step to the next."""
    seqs = list(live)
    if finished:
        seqs.append(max(finished, key=lambda h: h.score).token_ids)  # max keeps the first of ties, as the answer does
    first = seqs[0]
    n = len(first)
    for seq in seqs[1:]:
        n = min(n, len(seq))
        n = next((i for i in range(n) if seq[i] != first[i]), n)
    return first[:n]


def _settled(finished: list[Hypothesis], winners, reward: WeightedSum, lam: float, cfg: SearchConfig, top: _State) -> bool:
    """Can the search stop?  When every reward declares its maximum and log-probabilities are not
    length-normalised, a live state can at best keep its log-probability and reach the maximum
    reward, so the search stops once the best finished answer beats that bound for every live state
    (exact: no later answer could win).  Otherwise it stops as soon as a finished state ranks first."""
    bound = reward.upper_bound if reward else 0.0
    if bound is None or cfg.length_penalty:
        return top.hyp is not None
    if not finished:
        return False
    best = max(h.score for h in finished)
    return all(best >= st.logprob + lam * bound for st, _ in winners)


def _as_hyp(policy: Backend, st: _State, score: float) -> Hypothesis:
    """A live state of the final beam; its reward is the one its lookahead earned."""
    return Hypothesis(st.tokens, st.logprob, st.reward, st.rewards or {}, score, False, policy.decode(st.tokens))


def _unfinished(policy, reward, prompt_text, last_pool, cfg, lam) -> Hypothesis:
    """No state finished within the budget: rescore the last beam on its own text (no lookahead)."""
    states = [st for _, st in last_pool]
    texts = [policy.decode(st.tokens) for st in states]
    scores = reward.score([prompt_text] * len(texts), texts) if reward else None
    hyps = []
    for i, (st, text) in enumerate(zip(states, texts)):
        r = scores.total[i] if scores else 0.0
        s = normalised(st.logprob, len(st.tokens), cfg.length_penalty) + lam * r
        hyps.append(Hypothesis(st.tokens, st.logprob, r, scores.row(i) if scores else {}, s, False, text))
    return max(hyps, key=lambda h: h.score)
