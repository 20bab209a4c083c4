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
from ..constraints import Constraint
from ..constraints.matcher import attach
from ..errors import ConfigError
from ..rewards.base import WeightedSum
from .config import Hypothesis, SearchConfig, SearchResult, SearchStats
from .trace import TraceRecorder


def propose(next_logprobs: torch.Tensor, topk: int, top_p: float = 1.0) -> list[list[tuple[int, float]]]:
    """The actions of each row: its ``topk`` most likely tokens, cut to the smallest set reaching
    ``top_p`` (the most likely token always stays); best first, ties by token id."""
    k = min(topk, next_logprobs.shape[-1])
    vals, idx = next_logprobs.topk(k, dim=-1, sorted=True)
    out = []
    for v_row, i_row in zip(vals.tolist(), idx.tolist()):
        acts, mass = [], 0.0
        for v, i in zip(v_row, i_row):
            if acts and (mass >= top_p or v == float("-inf")):  # -inf: a token the constraint forbids
                break
            acts.append((i, v))
            mass += float(torch.tensor(v).exp())
        out.append(acts)
    return out


def normalised(logprob: float, n_tokens: int, length_penalty: float) -> float:
    return logprob / (max(n_tokens, 1) ** length_penalty) if length_penalty else logprob


def objective(logprob: float, fluency: float, n_tokens: int, cfg: SearchConfig) -> float:
    """The search's log-likelihood part: ``logP + cfg.fluency * logP_0`` (length-normalised when asked)."""
    return normalised(logprob + cfg.fluency * fluency, n_tokens, cfg.length_penalty)


@dataclass
class _State:
    tokens: list[int]
    logprob: float
    reward: float = 0.0
    rewards: dict | None = None
    hyp: Hypothesis | None = None  # set once finished
    fluency: float = 0.0  # log-prob of ``tokens`` in the neutral context
    start: int = 0  # the start state this state grew from (``deal_search``'s ``starts``)


class _Models:
    """The policy alone, or the policy plus a cheaper lookahead model (the paper's LLM1/LLM2) that
    shares its tokenizer, and optionally the fluency context: the policy's rows for the same answers
    read after a neutral prompt.  Hides from the search loop which model ran the rollout and where the
    context's rows are.

    The context's rows ride in the policy's own batch (rows ``R..2R-1`` of an ``R``-state beam), so
    they cost rows, never an extra sequential forward pass:

    * token mode commits one token per step, and a candidate's log-prob in the context is read from
      its state's context row.  Each context row lags one token behind its state: it feeds the token
      its state committed last step in the same forward that rolls out the new candidates, and its
      distribution after that token scores them.  ``R`` extra rows per step.
    * segment mode commits the lookahead too, so every candidate has a context twin fed the same
      tokens (``rollout(follow=...)``).  As many extra rows as candidates.
    """

    def __init__(self, policy: Backend, draft: Backend | None, context: Sequence[int] | None = None,
                 segment: bool = False, constraint: Constraint | None = None) -> None:
        self.policy, self.draft = policy, draft
        self.constraint = constraint
        self.context = list(context) if context else None
        if self.context is not None and draft is not None:
            raise ConfigError("fluency with a draft (lookahead) model is not supported; set fluency 0 or drop the draft model")
        if self.context is not None and not policy.supports_follow:
            raise ConfigError(f"fluency needs a backend that reads two prompts in one batch ({type(policy).__name__} "
                              "does not); set fluency 0")
        self.lag = self.context is not None and not segment and len(self.context) > 1
        self.pending: list[int] = []  # token mode: the token each state's context row has yet to feed

    def prefill(self, ids: list[int], starts: Sequence[Sequence[int]] = ()) -> tuple[Beam, Beam | None]:
        """The start beams; with a constraint, the policy's row (not the context's) and the draft's
        are masked from the first token on.  ``starts``: more start states, rows 1.. of the beam."""
        c = self.constraint
        prompts = [ids, *[list(s) for s in starts]]
        if self.context is not None:  # one context row per start state
            if self.lag:  # the context's last token is fed with the first candidates
                self.pending = [self.context[-1]] * len(prompts)
                rows = prompts + [self.context[:-1]] * len(prompts)
            else:
                rows = prompts + [self.context] * len(prompts)
            return attach(self.policy, self.policy.prefill_many(rows), c, range(len(prompts))), None
        if starts:
            return attach(self.policy, self.policy.prefill_many(prompts), c, range(len(prompts))), None
        return (attach(self.policy, self.policy.prefill(ids), c),
                attach(self.draft, self.draft.prefill(ids), c) if self.draft else None)

    def next_logprobs(self, beams) -> torch.Tensor:
        """The policy states' next-token distributions (the context's rows are not states)."""
        lp = beams[0].next_logprobs
        return lp[: len(lp) // 2] if self.context is not None else lp

    def expand(self, beams, parents, cands, steps, segment, sampler):
        """Roll out candidates; returns (tokens, logprobs under the policy, lengths, finished, handle,
        logprobs in the fluency context ``[candidates, tokens]`` or None)."""
        pbeam, dbeam = beams
        forced = torch.tensor(cands, dtype=torch.long)[:, None]
        n = len(parents)
        if self.lag:
            states = len(pbeam) // 2
            ctx_rows = [states + i for i in range(states)]
            ro = self.policy.rollout(pbeam, list(parents) + ctx_rows,
                                     torch.cat([forced, torch.tensor(self.pending, dtype=torch.long)[:, None]]), steps,
                                     sampler=sampler, follow=list(range(n)) + [0] * states)
            after = self.policy.peek(ro, [n + i for i in range(states)], 1)  # each context row, pending token fed
            ctx = after[torch.tensor(parents)].gather(1, forced)
            return ro.tokens[:n], ro.logprobs[:n], ro.length[:n], ro.finished[:n], (ro, None), ctx
        if self.context is not None:
            states = len(pbeam) // 2
            ro = self.policy.rollout(pbeam, list(parents) + [states + p for p in parents], forced.repeat(2, 1), steps,
                                     sampler=sampler, feed_last=segment, follow=list(range(n)) * 2)
            return ro.tokens[:n], ro.logprobs[:n], ro.length[:n], ro.finished[:n], (ro, None), ro.logprobs[n:]
        if self.draft is None:
            ro = self.policy.rollout(pbeam, parents, forced, steps, sampler=sampler, feed_last=segment)
            return ro.tokens, ro.logprobs, ro.length, ro.finished, (ro, None), None
        dro = self.draft.rollout(dbeam, parents, forced, steps, sampler=sampler, feed_last=segment)
        if not segment:  # token mode: only the candidate is committed, its log-prob is the policy's
            lp = dro.logprobs.clone()
            lp[:, 0] = pbeam.next_logprobs[torch.tensor(parents)].gather(1, forced).squeeze(1)
            return dro.tokens, lp, dro.length, dro.finished, (None, dro), None
        # segment mode: the committed chunk is scored by the policy in one forward pass
        pro = self.policy.rollout(pbeam, parents, dro.tokens, 0)
        return dro.tokens, pro.logprobs, dro.length, dro.finished, (pro, dro), None

    def commit(self, beams, handle, rows, keep, segment, cands, parents):
        pro, dro = handle
        n = len(parents)
        if self.lag:  # each winner's context row is its parent's, having fed the parent's pending token
            self.pending = [cands[r] for r in rows]
            return self.policy.commit(pro, list(rows) + [n + parents[r] for r in rows], keep), None
        if self.context is not None:
            return self.policy.commit(pro, list(rows) + [n + r for r in rows], keep), None
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
    fluency_ids: Sequence[int] | None = None,
    trace: TraceRecorder | None = None,
    constraint: Constraint | None = None,
    starts: Sequence[Sequence[int]] = (),
) -> SearchResult:
    """Run DeAL for one prompt.  ``lam`` overrides ``cfg.lam`` (beam search is DeAL with lam 0).

    ``constraint`` (``dealign.constraints``) masks every distribution the search proposes from and
    every lookahead token, its matcher states forked and committed with the rows (the backend's
    side, ``Beam.constraint``); the end-of-sequence token is allowed only where the format is complete.

    With ``cfg.fluency > 0``, ``fluency_ids`` is the neutral start state (the chat template around
    ``cfg.fluency_prompt``; ``Aligner.generate`` builds it) in which every committed token is read
    too, and ``cfg.fluency`` times that log-prob joins the score.  Why: the policy after "use all of
    these words: dog, frisbee, catch" finds "Dog, frisbee, catch." cheap, since it copies the prompt;
    the same model after a plain "Write one sentence." finds it as unlikely as any reader would, while
    a sentence costs about what it costs in the prompt's context (docs/fluency.md).

    ``on_commit(ids)``, if given, is called after every step that the search goes on from with the
    tokens every possible answer now starts with (see :func:`certain_prefix`; it only grows); it may
    raise to abort the search (a server's time limit, a client gone).

    ``trace``, if given, records every step (``search/trace.py``); it reads what the search computed
    and changes nothing.

    ``starts``: more start states searched together with ``prompt_ids`` (the same request under
    other instructions): the first step proposes from each, and their answers compete on the same
    score, each read with the log-prob of its own start.  Why: an instruction that makes a model
    refuse harmful requests also makes it refuse some benign ones; with both start states the
    reward, not the instruction, decides which opening a request gets.  ``Hypothesis.start`` says
    which start an answer came from (0: ``prompt_ids``)."""
    lam = cfg.lam if lam is None else lam
    if starts and draft is not None:
        raise ConfigError("several start states (instructions) cannot be searched with a draft (lookahead) model; "
                          "drop the draft model or give one instruction")
    if starts and not policy.supports_follow:
        raise ConfigError(f"several start states (instructions) need a backend that holds several prompts in one "
                          f"beam ({type(policy).__name__} does not); give one instruction")
    if cfg.fluency and not fluency_ids:
        raise ConfigError("fluency > 0 needs the token ids of the neutral context (fluency_ids): Aligner.generate "
                          "builds them from fluency_prompt; set fluency 0 to search without it")
    start = time.perf_counter()
    before = policy.counters.snapshot()
    d_before = draft.counters.forward_passes if draft else 0
    models = _Models(policy, draft, fluency_ids if cfg.fluency else None, segment=cfg.mode == "segment",
                     constraint=constraint)
    gen = torch.Generator().manual_seed(cfg.seed)
    sampler = Sampler(temperature=cfg.rollout_temperature, generator=gen)
    stats = SearchStats()

    beams = models.prefill(list(prompt_ids), starts)
    live: list[_State] = [_State([], 0.0, start=i) for i in range(1 + len(starts))]  # rows of the beams, in order
    kept: list[_State] = []  # finished states still in the beam
    finished_all: list[Hypothesis] = []
    last_pool: list[tuple[float, _State]] = []

    while live:
        remaining = cfg.max_new_tokens - len(live[0].tokens)
        if remaining <= 0:
            break
        topk, lookahead, segment = _schedule(cfg, len(live[0].tokens))
        actions = propose(models.next_logprobs(beams), topk, cfg.top_p)
        parents, cands, cand_lp = [], [], []
        for row, acts in enumerate(actions):
            for tok, lp in acts:
                parents.append(row)
                cands.append(tok)
                cand_lp.append(lp)
        steps = min(lookahead, remaining - 1)
        tokens, logprobs, length, fin, handle, ctx_lp = models.expand(beams, parents, cands, steps, segment, sampler)
        tokens_l, logprobs_l = tokens.tolist(), logprobs.tolist()
        ctx_l = ctx_lp.tolist() if ctx_lp is not None else None

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
            flu = live[p].fluency + (sum(ctx_l[j][: len(committed)]) if ctx_l is not None else 0.0)
            commits.append((prefix + committed, lp, committed[-1] in policy.eos_ids, flu))
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
        for j, (toks, lp, done, flu) in enumerate(commits):
            r = scores.total[j] if scores else 0.0
            score = objective(lp, flu, len(toks), cfg) + lam * r
            st = _State(toks, lp, r, scores.row(j) if scores else {}, fluency=flu, start=live[parents[j]].start)
            if done:
                st.hyp = Hypothesis(toks, lp, r, st.rewards, score, True, texts[j], fluency=flu, start=st.start)
                finished_all.append(st.hyp)
            pool.append((score, st, j))
        pool.sort(key=lambda x: -x[0])  # stable: ties keep proposal order
        top = pool[: cfg.beam]
        last_pool = [(s, st) for s, st, _ in top]
        stats.steps += 1
        if trace is not None:
            _trace_step(trace, live, pool, top, commits, cands, cand_lp, parents, [t[: n] for t, n in zip(tokens_l, length)],
                        cfg, lam, segment, topk, lookahead)

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
    if trace is not None:
        trace.finish(best, stats)
    return SearchResult(best=best, beam=beam_out, stats=stats)


def _trace_step(trace: TraceRecorder, live, pool, top, commits, cands, cand_lp, parents, spans, cfg, lam, segment,
                topk, lookahead) -> None:
    """Hand one step to the trace: the beam entering it, every candidate's numbers, who survived."""
    top_ids = {id(st) for _, st, _ in top}
    held = [(st, s) for s, st, j in pool if j < 0]
    cands_out = [None] * len(commits)
    for rank, (score, st, j) in enumerate(pool):
        if j < 0:
            continue
        logp = objective(st.logprob, st.fluency, len(st.tokens), cfg)
        cands_out[j] = {"parent": parents[j], "token": cands[j], "span": spans[j],
                        "committed": st.tokens[len(live[parents[j]].tokens):], "logprob": st.logprob,
                        "token_logprob": cand_lp[j], "rewards": st.rewards, "reward": st.reward, "logp_part": logp,
                        "reward_part": lam * st.reward, "score": score, "finished": st.hyp is not None, "rank": rank}
    trace.step(states=[(st.tokens, st.logprob) for st in live],
               held=[(st.tokens, s, st.hyp.text) for st, s in held], held_kept=[id(st) in top_ids for st, _ in held],
               candidates=cands_out, kept=[j for _, _, j in top if j >= 0], mode="segment" if segment else "token",
               topk=topk, lookahead=lookahead)


def _schedule(cfg: SearchConfig, made: int) -> tuple[int, int, bool]:
    """(topk, lookahead, segment mode?) for the step after ``made`` generated tokens: the opening's
    settings for its first ``open_tokens`` tokens (always token mode, so the opening ends exactly
    there), the search's own after them."""
    if made < cfg.open_tokens:
        return cfg.open_topk, cfg.open_lookahead, False
    return cfg.topk, cfg.lookahead, cfg.mode == "segment"


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
    return all(best >= st.logprob + cfg.fluency * st.fluency + lam * bound for st, _ in winners)


def _as_hyp(policy: Backend, st: _State, score: float) -> Hypothesis:
    """A live state of the final beam; its reward is the one its lookahead earned."""
    return Hypothesis(st.tokens, st.logprob, st.reward, st.rewards or {}, score, False, policy.decode(st.tokens),
                      fluency=st.fluency, start=st.start)


def _unfinished(policy, reward, prompt_text, last_pool, cfg, lam) -> Hypothesis:
    """No state finished within the budget: rescore the last beam on its own text (no lookahead)."""
    states = [st for _, st in last_pool]
    texts = [policy.decode(st.tokens) for st in states]
    scores = reward.score([prompt_text] * len(texts), texts) if reward else None
    hyps = []
    for i, (st, text) in enumerate(zip(states, texts)):
        r = scores.total[i] if scores else 0.0
        s = objective(st.logprob, st.fluency, len(st.tokens), cfg) + lam * r
        hyps.append(Hypothesis(st.tokens, st.logprob, r, scores.row(i) if scores else {}, s, False, text, fluency=st.fluency,
                               start=st.start))
    return max(hyps, key=lambda h: h.score)
