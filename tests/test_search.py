"""DeAL and the baselines on tiny random models: beam width, determinism, equality with the
one-row-at-a-time oracle, the score formula, reward steering, end-of-sequence handling, draft models
and the cost counters."""

from __future__ import annotations

import math

import pytest
import torch

from dealign.backends.hf import HFBackend, NaiveHFBackend
from dealign.rewards import Reward, WeightedSum, as_reward
from dealign.search import SearchConfig, run_search
from dealign.search.deal import normalised, propose

from conftest import PROMPT, SEARCH_CONFIGS as ORACLE_CONFIGS, EosBoost, letters  # noqa: E402


@pytest.fixture(scope="module")
def no_eos_model(tiny_model, tiny_tokenizer):
    """The tiny model with end-of-sequence made impossible: every search runs to its budget."""
    return EosBoost(tiny_model, tiny_tokenizer.eos_token_id, -1e4)


def fast(model, tok):
    return HFBackend(model, tok)


def search(backend, ids, cfg, reward=None, draft=None):
    return run_search(backend, ids, as_reward(reward), cfg, prompt_text=PROMPT, draft=draft)


def sequence_logprob(model, prompt_ids, answer) -> float:
    """log P(answer | prompt) from one fresh forward of prompt + answer (no cache)."""
    ids = list(prompt_ids) + list(answer)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    P = len(prompt_ids)
    return float(sum(lp[P - 1 + i, t] for i, t in enumerate(answer)))


# beam width -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["token", "segment"])
@pytest.mark.parametrize("early_stop", [True, False])
def test_beam_width_is_respected_at_every_step(tiny_model, tiny_tokenizer, prompt_ids, monkeypatch, mode, early_stop):
    # EOS likely after a few tokens, so finished states take beam slots too
    model = EosBoost(tiny_model, tiny_tokenizer.eos_token_id, 3.5, from_pos=len(prompt_ids) + 3)
    backend = fast(model, tiny_tokenizer)
    commits, rollouts = [], []
    real_commit, real_rollout = backend.commit, backend.rollout

    def commit(ro, rows, keep):
        commits.append(len(rows))
        return real_commit(ro, rows, keep)

    def rollout(beam, parents, forced, steps, **kw):
        rollouts.append((len(beam), len(parents)))
        return real_rollout(beam, parents, forced, steps, **kw)

    monkeypatch.setattr(backend, "commit", commit)
    monkeypatch.setattr(backend, "rollout", rollout)
    cfg = SearchConfig(beam=3, topk=4, lookahead=2, lam=1.0, mode=mode, max_new_tokens=10, early_stop=early_stop)
    res = search(backend, prompt_ids, cfg, letters)
    assert commits, "the search never committed a step"
    assert all(1 <= n <= 3 for n in commits)
    assert max(commits) == 3  # the beam does fill up
    assert all(rows <= 3 and cands <= 3 * 4 for rows, cands in rollouts)
    assert 1 <= len(res.beam) <= 3
    assert res.stats.steps == len(rollouts)


# determinism ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        SearchConfig(mode="token", beam=2, topk=3, lookahead=3, rollout_temperature=0.9, max_new_tokens=8, seed=4),
        SearchConfig(mode="segment", beam=2, topk=3, lookahead=3, rollout_temperature=0.9, max_new_tokens=10, seed=4),
        SearchConfig(strategy="sample", temperature=1.0, top_p=0.9, max_new_tokens=10, seed=4),
        SearchConfig(strategy="best-of-n", n=5, temperature=1.0, max_new_tokens=10, seed=4),
    ],
    ids=["deal-token", "deal-segment", "sample", "best-of-n"],
)
def test_same_seed_same_tokens(tiny_model, tiny_tokenizer, prompt_ids, cfg):
    a = search(fast(tiny_model, tiny_tokenizer), prompt_ids, cfg, letters)
    b = search(fast(tiny_model, tiny_tokenizer), prompt_ids, cfg, letters)
    assert a.best.token_ids == b.best.token_ids
    assert a.best.score == b.best.score
    assert [h.token_ids for h in a.beam] == [h.token_ids for h in b.beam]
    # and the seed matters: some other seed gives another answer
    others = [search(fast(tiny_model, tiny_tokenizer), prompt_ids, cfg.replace(seed=s), letters) for s in range(5, 9)]
    assert any([h.token_ids for h in o.beam] != [h.token_ids for h in a.beam] for o in others)


# batched lookahead == one-row-at-a-time lookahead -----------------------------------------------------



@pytest.mark.parametrize("name", list(ORACLE_CONFIGS))
def test_search_equals_the_naive_oracle(tiny_model, tiny_tokenizer, prompt_ids, name):
    cfg = ORACLE_CONFIGS[name]
    # EOS becomes likely late in the answer, so finished states are exercised too
    model = EosBoost(tiny_model, tiny_tokenizer.eos_token_id, 3.0, from_pos=len(prompt_ids) + 4)
    a = search(HFBackend(model, tiny_tokenizer), prompt_ids, cfg, letters)
    b = search(NaiveHFBackend(model, tiny_tokenizer), prompt_ids, cfg, letters)
    assert a.best.token_ids == b.best.token_ids
    assert a.best.finished == b.best.finished
    assert math.isclose(a.best.score, b.best.score, rel_tol=1e-4, abs_tol=1e-4)
    assert [h.token_ids for h in a.beam] == [h.token_ids for h in b.beam]
    for ha, hb in zip(a.beam, b.beam):
        assert math.isclose(ha.score, hb.score, rel_tol=1e-4, abs_tol=1e-4)
    assert a.stats.steps == b.stats.steps
    # the oracle re-encodes everything; the cached backend processes far fewer tokens
    assert a.stats.tokens_processed < b.stats.tokens_processed


def test_top_p_limits_the_actions(tiny_model, tiny_tokenizer, prompt_ids):
    beam = HFBackend(tiny_model, tiny_tokenizer).prefill(prompt_ids)
    full = propose(beam.next_logprobs, 6)[0]
    assert len(full) == 6
    assert [t for t, _ in full] == beam.next_logprobs[0].topk(6).indices.tolist()
    one = propose(beam.next_logprobs, 6, top_p=1e-6)[0]
    assert one == full[:1]
    mass = propose(beam.next_logprobs, 6, top_p=0.08)[0]
    probs = [math.exp(v) for _, v in mass]
    assert sum(probs[:-1]) < 0.08 and (sum(probs) >= 0.08 or len(mass) == 6)


# the score --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        SearchConfig(mode="token", beam=2, topk=3, lookahead=2, lam=3.0, max_new_tokens=7),
        SearchConfig(mode="token", beam=2, topk=3, lookahead=2, lam=3.0, length_penalty=1.0, max_new_tokens=7),
        SearchConfig(mode="segment", beam=2, topk=3, lookahead=2, lam=3.0, length_penalty=0.5, max_new_tokens=9),
    ],
    ids=["token", "token-lp", "segment-lp"],
)
@pytest.mark.parametrize("eos", [False, True], ids=["budget", "eos"])
def test_score_is_logprob_over_length_plus_lam_reward(tiny_model, tiny_tokenizer, prompt_ids, cfg, eos):
    model = EosBoost(tiny_model, tiny_tokenizer.eos_token_id, 30.0 if eos else -1e4, from_pos=len(prompt_ids) + 4)
    res = search(HFBackend(model, tiny_tokenizer), prompt_ids, cfg, letters)
    best = res.best
    assert best.finished is eos
    lp = sequence_logprob(model, prompt_ids, best.token_ids)
    assert math.isclose(best.logprob, lp, rel_tol=1e-4, abs_tol=1e-4)
    # the reported reward is the reward of the answer's own text
    assert best.text == tiny_tokenizer.decode(best.token_ids, skip_special_tokens=True)
    assert math.isclose(best.reward, letters([PROMPT], [best.text])[0], abs_tol=1e-9)
    assert best.rewards == {"letters": pytest.approx(best.reward)}
    expected = lp / len(best.token_ids) ** cfg.length_penalty + cfg.lam * best.reward
    assert math.isclose(best.score, expected, rel_tol=1e-4, abs_tol=1e-4)
    assert normalised(best.logprob, len(best.token_ids), cfg.length_penalty) + cfg.lam * best.reward == pytest.approx(
        best.score
    )


def test_beam_hypotheses_carry_policy_logprobs(tiny_model, tiny_tokenizer, prompt_ids):
    cfg = SearchConfig(mode="segment", beam=3, topk=3, lookahead=2, lam=1.0, max_new_tokens=9)
    res = search(HFBackend(tiny_model, tiny_tokenizer), prompt_ids, cfg, letters)
    for h in res.beam:
        assert math.isclose(h.logprob, sequence_logprob(tiny_model, prompt_ids, h.token_ids), rel_tol=1e-4, abs_tol=1e-4)


# the reward steers the search -------------------------------------------------------------------------


def test_reward_makes_deal_choose_a_token_greedy_never_emits(tiny_model, tiny_tokenizer, prompt_ids):
    backend = HFBackend(tiny_model, tiny_tokenizer)
    greedy = search(backend, prompt_ids, SearchConfig(strategy="greedy", max_new_tokens=10)).best
    beam = backend.prefill(prompt_ids)
    # a plain-word token among the first step's top 8 that greedy's text does not contain
    target = None
    for tok in beam.next_logprobs[0].topk(8).indices.tolist():
        s = tiny_tokenizer.decode([tok])
        if tok not in greedy.token_ids and len(s.strip()) >= 2 and s.strip().isalpha() and s not in greedy.text:
            target = (tok, s)
            break
    assert target is not None, "no suitable target token in the first step's top 8"
    tok, s = target

    def has_target(prompts, completions):
        return [1.0 if s in c else 0.0 for c in completions]

    cfg = SearchConfig(beam=2, topk=8, lookahead=2, lam=50.0, max_new_tokens=10)
    deal = search(backend, prompt_ids, cfg, has_target).best
    assert s not in greedy.text
    assert s in deal.text
    assert deal.reward == 1.0
    # without the reward (lam 0) the same search does not go there
    plain = search(backend, prompt_ids, cfg.replace(lam=0.0), has_target).best
    assert plain.token_ids != deal.token_ids


# end of sequence --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        SearchConfig(mode="token", beam=2, topk=3, lookahead=2, lam=1.0, max_new_tokens=12),
        SearchConfig(mode="segment", beam=2, topk=3, lookahead=2, lam=1.0, max_new_tokens=12),
        SearchConfig(strategy="greedy", max_new_tokens=12),
        SearchConfig(strategy="beam", beam=3, max_new_tokens=12),
        SearchConfig(strategy="best-of-n", n=4, max_new_tokens=12),
    ],
    ids=["deal-token", "deal-segment", "greedy", "beam", "best-of-n"],
)
def test_answer_ends_at_eos(tiny_model, tiny_tokenizer, prompt_ids, cfg):
    eos = tiny_tokenizer.eos_token_id
    model = EosBoost(tiny_model, eos, 40.0, from_pos=len(prompt_ids) + 4)  # 5th answer token is EOS
    res = search(HFBackend(model, tiny_tokenizer), prompt_ids, cfg, letters)
    best = res.best
    assert best.finished is True
    assert best.token_ids[-1] == eos
    assert eos not in best.token_ids[:-1]
    assert len(best.token_ids) <= 5
    assert res.stats.forward_passes < 12  # stopped well before the budget


def test_finished_state_stays_in_the_beam(tiny_model, tiny_tokenizer, prompt_ids):
    """EOS follows token X (the first step's best).  [X, EOS] enters the beam at step 2 and, with
    early_stop off, the search goes on to the budget with it kept in the beam; it is the answer."""
    eos = tiny_tokenizer.eos_token_id
    first = HFBackend(tiny_model, tiny_tokenizer).prefill(prompt_ids).next_logprobs[0]
    x = int(first.argmax())
    assert x != prompt_ids[-1]
    model = EosBoost(tiny_model, eos, 30.0, after_token=x)
    cfg = SearchConfig(beam=2, topk=2, lookahead=0, lam=0.0, early_stop=False, max_new_tokens=6)
    res = search(HFBackend(model, tiny_tokenizer), prompt_ids, cfg)
    assert res.best.token_ids == [x, eos]
    assert res.best.finished
    assert res.stats.steps == 6  # the search did not stop when [X, EOS] reached the top
    assert any(h.finished and h.token_ids == [x, eos] for h in res.beam)
    assert any(not h.finished for h in res.beam)
    assert len(res.beam) == 2
    # with early stopping the search ends as soon as the finished state leads the beam
    res2 = search(HFBackend(model, tiny_tokenizer), prompt_ids, cfg.replace(early_stop=True))
    assert res2.best.token_ids == [x, eos]
    assert res2.stats.steps == 2


@pytest.mark.parametrize("mode", ["token", "segment"])
@pytest.mark.parametrize("eos_from", [3, 5])
def test_early_stop_with_a_bounded_reward_is_exact(tiny_model, tiny_tokenizer, prompt_ids, mode, eos_from):
    """With rewards that declare their maximum and no length normalisation, stopping early never
    changes the answer: no live state could still beat the best finished one."""
    model = EosBoost(tiny_model, tiny_tokenizer.eos_token_id, 4.0, from_pos=len(prompt_ids) + eos_from)
    bounded = Reward(letters, "letters", upper_bound=1.0)
    cfg = SearchConfig(mode=mode, beam=3, topk=3, lookahead=1, lam=2.0, max_new_tokens=10)
    stop = search(HFBackend(model, tiny_tokenizer), prompt_ids, cfg, bounded)
    full = search(HFBackend(model, tiny_tokenizer), prompt_ids, cfg.replace(early_stop=False), bounded)
    assert stop.best.finished and full.best.finished
    assert stop.best.token_ids == full.best.token_ids
    assert stop.best.score == pytest.approx(full.best.score)
    assert stop.stats.steps <= full.stats.steps


def test_early_stop_waits_while_a_live_state_can_still_win(tiny_model, tiny_tokenizer, prompt_ids):
    """A finished state leads, but a live one is within lam * (max reward) of it: the search goes on."""
    eos = tiny_tokenizer.eos_token_id
    first = HFBackend(tiny_model, tiny_tokenizer).prefill(prompt_ids).next_logprobs[0]
    x = int(first.argmax())
    model = EosBoost(tiny_model, eos, 30.0, after_token=x)
    zero = Reward(lambda p, c: [0.0] * len(c), "zero", upper_bound=1.0)  # could reach 1, never does
    cfg = SearchConfig(beam=2, topk=2, lookahead=0, lam=50.0, max_new_tokens=6)
    res = search(HFBackend(model, tiny_tokenizer), prompt_ids, cfg, zero)
    assert res.best.token_ids == [x, eos]
    assert res.stats.steps > 2  # the heuristic rule would have stopped at step 2


def test_best_finished_is_chosen_over_better_unfinished(tiny_model, tiny_tokenizer, prompt_ids):
    """A reward that punishes finished texts keeps them out of the beam, yet the answer is finished."""
    eos = tiny_tokenizer.eos_token_id
    model = EosBoost(tiny_model, eos, 10.0, from_pos=len(prompt_ids) + 3)

    def no_end(prompts, completions, finished):
        return [-1.0 if f else 0.0 for f in finished]

    cfg = SearchConfig(beam=2, topk=3, lookahead=0, lam=100.0, max_new_tokens=6)
    res = search(HFBackend(model, tiny_tokenizer), prompt_ids, cfg, Reward(no_end, "no_end"))
    assert res.best.finished
    assert res.best.token_ids[-1] == eos
    unfinished = [h for h in res.beam if not h.finished]
    assert unfinished
    assert max(h.score for h in unfinished) > res.best.score


@pytest.mark.parametrize(
    "cfg",
    [
        SearchConfig(mode="token", beam=2, topk=3, lookahead=3, max_new_tokens=7),
        SearchConfig(mode="segment", beam=2, topk=3, lookahead=3, max_new_tokens=7),
        SearchConfig(mode="segment", beam=2, topk=3, lookahead=4, max_new_tokens=7),
        SearchConfig(strategy="greedy", max_new_tokens=7),
        SearchConfig(strategy="sample", max_new_tokens=7),
        SearchConfig(strategy="beam", beam=2, max_new_tokens=7),
        SearchConfig(strategy="best-of-n", n=3, max_new_tokens=7),
    ],
    ids=["deal-token", "deal-segment-3", "deal-segment-4", "greedy", "sample", "beam", "best-of-n"],
)
def test_nothing_finishes_within_the_budget(no_eos_model, tiny_tokenizer, prompt_ids, cfg):
    res = search(HFBackend(no_eos_model, tiny_tokenizer), prompt_ids, cfg, letters)
    assert res.best.finished is False
    assert len(res.best.token_ids) == cfg.max_new_tokens
    assert all(len(h.token_ids) == cfg.max_new_tokens and not h.finished for h in res.beam)
    # the unfinished answer's reward is its own text's
    if cfg.strategy in ("deal", "best-of-n"):
        assert res.best.reward == pytest.approx(letters([PROMPT], [res.best.text])[0])


# equivalences with the baselines ----------------------------------------------------------------------


@pytest.mark.parametrize("beam", [1, 2, 4])
def test_deal_without_reward_or_lookahead_is_beam_search(tiny_model, tiny_tokenizer, prompt_ids, beam):
    backend = HFBackend(tiny_model, tiny_tokenizer)
    d = search(backend, prompt_ids, SearchConfig(beam=beam, topk=beam, lookahead=0, lam=0.0, max_new_tokens=8), letters)
    b = search(backend, prompt_ids, SearchConfig(strategy="beam", beam=beam, max_new_tokens=8), letters)
    assert d.best.token_ids == b.best.token_ids
    assert [h.token_ids for h in d.beam] == [h.token_ids for h in b.beam]
    assert b.best.score == pytest.approx(b.best.logprob)  # beam search ranks by log-probability only
    # beam search still reports the reward of its answer
    assert b.best.reward == pytest.approx(letters([PROMPT], [b.best.text])[0])


def test_beam_search_ignores_the_reward_for_ranking(tiny_model, tiny_tokenizer, prompt_ids):
    backend = HFBackend(tiny_model, tiny_tokenizer)
    cfg = SearchConfig(strategy="beam", beam=3, lam=100.0, lookahead=5, max_new_tokens=6)
    a = search(backend, prompt_ids, cfg, letters)
    b = search(backend, prompt_ids, cfg, lambda p, c: [-len(x) for x in c])
    assert a.best.token_ids == b.best.token_ids


@pytest.mark.parametrize("lookahead", [0, 3])
def test_deal_with_beam_1_topk_1_is_greedy(tiny_model, tiny_tokenizer, prompt_ids, lookahead):
    backend = HFBackend(tiny_model, tiny_tokenizer)
    g = search(backend, prompt_ids, SearchConfig(strategy="greedy", max_new_tokens=12))
    d = search(backend, prompt_ids, SearchConfig(beam=1, topk=1, lookahead=lookahead, lam=0.0, max_new_tokens=12))
    assert d.best.token_ids == g.best.token_ids
    assert d.best.logprob == pytest.approx(g.best.logprob, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("max_new_tokens", [1, 12])
def test_greedy_equals_transformers_generate(tiny_model, tiny_tokenizer, prompt_ids, max_new_tokens):
    res = search(HFBackend(tiny_model, tiny_tokenizer), prompt_ids, SearchConfig(strategy="greedy", max_new_tokens=max_new_tokens))
    with torch.no_grad():
        out = tiny_model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tiny_tokenizer.eos_token_id,
        )
    assert res.best.token_ids == out[0, len(prompt_ids):].tolist()
    assert res.best.logprob == pytest.approx(sequence_logprob(tiny_model, prompt_ids, res.best.token_ids), abs=1e-4)


def test_best_of_n_picks_the_highest_reward_sample(tiny_model, tiny_tokenizer, prompt_ids):
    cfg = SearchConfig(strategy="best-of-n", n=6, temperature=1.0, max_new_tokens=8, seed=1)
    res = search(HFBackend(tiny_model, tiny_tokenizer), prompt_ids, cfg, letters)
    samples = res.beam
    assert len(samples) == 6
    assert len({tuple(h.token_ids) for h in samples}) > 1  # the samples differ
    for h in samples:
        assert h.reward == pytest.approx(letters([PROMPT], [h.text])[0])
        assert h.logprob == pytest.approx(sequence_logprob(tiny_model, prompt_ids, h.token_ids), abs=1e-3)
    assert res.best in samples
    same_status = [h for h in samples if h.finished == res.best.finished]
    assert res.best.reward == max(h.reward for h in same_status)
    if any(h.finished for h in samples):
        assert res.best.finished
    assert res.best is max(samples, key=lambda h: (h.finished, h.reward, h.logprob))
    assert len({h.reward for h in samples}) > 1  # the choice was not a tie
    # n=1 is plain sampling with the same seed
    one = search(HFBackend(tiny_model, tiny_tokenizer), prompt_ids, cfg.replace(n=1), letters)
    smp = search(HFBackend(tiny_model, tiny_tokenizer), prompt_ids, cfg.replace(strategy="sample"), letters)
    assert one.best.token_ids == smp.best.token_ids


# draft (lookahead) model ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["token", "segment"])
def test_draft_model_runs_the_rollouts(tiny_model, tiny_draft, tiny_tokenizer, prompt_ids, mode):
    cfg = SearchConfig(mode=mode, beam=2, topk=3, lookahead=3, lam=2.0, max_new_tokens=8)
    res = search(HFBackend(tiny_model, tiny_tokenizer), prompt_ids, cfg, letters, draft=HFBackend(tiny_draft, tiny_tokenizer))
    assert res.stats.draft_forward_passes > 0
    assert 1 <= len(res.best.token_ids) <= 8
    # the committed tokens are scored by the policy, not the draft
    lp = sequence_logprob(tiny_model, prompt_ids, res.best.token_ids)
    assert res.best.logprob == pytest.approx(lp, rel=1e-4, abs=1e-4)
    # and the oracle backends agree
    naive = search(
        NaiveHFBackend(tiny_model, tiny_tokenizer), prompt_ids, cfg, letters, draft=NaiveHFBackend(tiny_draft, tiny_tokenizer)
    )
    assert naive.best.token_ids == res.best.token_ids


@pytest.mark.parametrize("mode", ["token", "segment"])
def test_draft_equal_to_policy_changes_nothing(tiny_model, tiny_tokenizer, prompt_ids, mode):
    cfg = SearchConfig(mode=mode, beam=2, topk=3, lookahead=3, lam=2.0, max_new_tokens=9)
    alone = search(HFBackend(tiny_model, tiny_tokenizer), prompt_ids, cfg, letters)
    twin = HFBackend(tiny_model, tiny_tokenizer)
    drafted = search(HFBackend(tiny_model, tiny_tokenizer), prompt_ids, cfg, letters, draft=twin)
    assert drafted.stats.draft_forward_passes > 0
    assert drafted.best.token_ids == alone.best.token_ids
    assert [h.token_ids for h in drafted.beam] == [h.token_ids for h in alone.beam]
    assert drafted.best.score == pytest.approx(alone.best.score, rel=1e-4, abs=1e-4)


# cost counters ----------------------------------------------------------------------------------------


def _passes_token_mode(max_new: int, lookahead: int) -> int:
    """1 prefill + per step one rollout: the forced token plus all but the last lookahead token."""
    total = 1
    for made in range(max_new):
        steps = min(lookahead, max_new - made - 1)
        total += max(steps, 1)
    return total


@pytest.mark.parametrize("mode", ["token", "segment"])
def test_forward_passes_do_not_grow_with_the_number_of_candidates(no_eos_model, tiny_tokenizer, prompt_ids, mode):
    stats = {}
    for topk in (2, 6):
        for beam in (1, 3):
            cfg = SearchConfig(mode=mode, beam=beam, topk=topk, lookahead=3, lam=1.0, max_new_tokens=8)
            stats[topk, beam] = search(HFBackend(no_eos_model, tiny_tokenizer), prompt_ids, cfg, letters).stats
    passes = {s.forward_passes for s in stats.values()}
    assert len(passes) == 1, stats  # rollouts of all candidates are batched
    if mode == "token":
        assert passes == {_passes_token_mode(8, 3)}
        assert all(s.steps == 8 for s in stats.values())
    else:  # two segments of 4 tokens, each one forward per token (the last one fed for the commit)
        assert passes == {1 + 4 + 4}
        assert all(s.steps == 2 for s in stats.values())
    # more candidates: more tokens through the model, more candidates scored
    assert stats[6, 3].tokens_processed > stats[2, 3].tokens_processed > stats[2, 1].tokens_processed
    assert stats[6, 3].candidates_scored > stats[2, 3].candidates_scored
    assert stats[6, 1].candidates_scored == 6 * stats[6, 1].steps
    assert all(s.reward_calls == s.steps for s in stats.values())
    assert all(s.seconds > 0 for s in stats.values())


# an independent, literal implementation of the algorithm ---------------------------------------------


def reference_deal(model, tokenizer, prompt_ids, reward_fn, cfg: SearchConfig):
    """DeAL written down plainly from its description, with a full forward per token and no cache:
    every live state proposes its top-k tokens (cut to top-p), each is extended by a greedy lookahead,
    the text is scored, candidates are ranked by logP(committed)/len**length_penalty + lam * R
    together with the finished states still in the beam; the best ``beam`` survive.  Returns
    (token ids of the answer, its score)."""
    eos = tokenizer.eos_token_id

    def next_lp(ids):
        with torch.no_grad():
            return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)

    def score(lp, n, r):
        return (lp / n**cfg.length_penalty if cfg.length_penalty else lp) + cfg.lam * r

    live = [([], 0.0)]
    kept = []  # (score, tokens, lp), finished and in the beam
    finished_all = []
    last = []
    while live:
        made = len(live[0][0])
        if made >= cfg.max_new_tokens:
            break
        opening = made < cfg.open_tokens  # the opening schedule: its own top-k and lookahead, token mode
        topk, lookahead = (cfg.open_topk, cfg.open_lookahead) if opening else (cfg.topk, cfg.lookahead)
        segment = cfg.mode == "segment" and not opening
        steps = min(lookahead, cfg.max_new_tokens - made - 1)
        cands = []
        for tokens, lp in live:
            dist = next_lp(list(prompt_ids) + tokens)
            vals, idx = dist.topk(topk)
            mass = 0.0
            for v, t in zip(vals.tolist(), idx.tolist()):
                if cands and cands[-1][0] is tokens and mass >= cfg.top_p:
                    break
                mass += math.exp(v)
                span, span_lp = [t], [v]
                while span[-1] != eos and len(span) < 1 + steps:
                    d = next_lp(list(prompt_ids) + tokens + span)
                    nxt = int(d.argmax())
                    span.append(nxt)
                    span_lp.append(float(d[nxt]))
                text = tokenizer.decode(tokens + span, skip_special_tokens=True)
                r = reward_fn([PROMPT], [text])[0]
                committed = span if segment else span[:1]
                c_lp = lp + (sum(span_lp) if segment else span_lp[0])
                done = committed[-1] == eos
                cands.append((tokens, tokens + committed, c_lp, r, done))
        pool = [(s, toks, lp, r, True) for s, toks, lp, r in kept]
        for _, toks, lp, r, done in cands:
            s = score(lp, len(toks), r)
            pool.append((s, toks, lp, r, done))
            if done:
                finished_all.append((s, toks))
        pool.sort(key=lambda x: -x[0])
        top = pool[: cfg.beam]
        last = top
        kept = [(s, toks, lp, r) for s, toks, lp, r, done in top if done]
        live = [(toks, lp) for s, toks, lp, r, done in top if not done]
        if cfg.early_stop and top[0][4]:
            break
    if finished_all:
        s, toks = max(finished_all, key=lambda x: x[0])
        return toks, s
    best = None
    for _, toks, lp, _, _ in last:
        r = reward_fn([PROMPT], [tokenizer.decode(toks, skip_special_tokens=True)])[0]
        s = score(lp, len(toks), r)
        if best is None or s > best[1]:
            best = (toks, s)
    return best


REFERENCE_CONFIGS = {
    "token-L0": SearchConfig(mode="token", beam=2, topk=3, lookahead=0, lam=2.0, max_new_tokens=6),
    "token-L2": SearchConfig(mode="token", beam=3, topk=3, lookahead=2, lam=2.0, max_new_tokens=6),
    "token-top_p": SearchConfig(mode="token", beam=2, topk=5, top_p=0.06, lookahead=1, lam=2.0, max_new_tokens=5),
    "token-length_penalty": SearchConfig(mode="token", beam=2, topk=3, lookahead=2, lam=0.5, length_penalty=1.0,
                                         max_new_tokens=6),
    "token-no-early-stop": SearchConfig(mode="token", beam=3, topk=2, lookahead=1, lam=1.0, early_stop=False,
                                        max_new_tokens=6),
    "segment-L2": SearchConfig(mode="segment", beam=2, topk=3, lookahead=2, lam=2.0, max_new_tokens=9),
    "segment-length_penalty": SearchConfig(mode="segment", beam=2, topk=3, lookahead=1, lam=0.5, length_penalty=0.7,
                                           max_new_tokens=8),
    "beam-search": SearchConfig(mode="token", beam=3, topk=3, lookahead=0, lam=0.0, max_new_tokens=6),
    "opening-then-segment": SearchConfig(mode="segment", beam=2, topk=1, lookahead=3, lam=2.0, max_new_tokens=10,
                                         open_tokens=2, open_topk=5, open_lookahead=2),
    "opening-then-token": SearchConfig(mode="token", beam=2, topk=2, lookahead=0, lam=2.0, max_new_tokens=6,
                                       open_tokens=3, open_topk=4, open_lookahead=1),
}


@pytest.mark.parametrize("eos_at", [None, 4], ids=["plain", "eos"])
@pytest.mark.parametrize("name", list(REFERENCE_CONFIGS))
def test_search_equals_a_literal_reference_implementation(tiny_model, tiny_tokenizer, prompt_ids, name, eos_at):
    cfg = REFERENCE_CONFIGS[name]
    model = tiny_model
    if eos_at is not None:
        model = EosBoost(tiny_model, tiny_tokenizer.eos_token_id, 3.0, from_pos=len(prompt_ids) + eos_at)
    ref_tokens, ref_score = reference_deal(model, tiny_tokenizer, prompt_ids, letters, cfg)
    res = search(HFBackend(model, tiny_tokenizer), prompt_ids, cfg, letters)
    assert res.best.token_ids == ref_tokens
    assert res.best.score == pytest.approx(ref_score, rel=1e-4, abs=1e-4)


# rewards asked to run every n tokens -------------------------------------------------------------------


def test_every_n_tokens_reward_runs_every_n_steps_in_token_mode(no_eos_model, tiny_tokenizer, prompt_ids):
    calls = []

    def costly(prompts, completions):
        calls.append(len(completions))
        return [len(c) for c in completions]

    cfg = SearchConfig(mode="token", beam=2, topk=2, lookahead=1, max_new_tokens=8)
    res = search(HFBackend(no_eos_model, tiny_tokenizer), prompt_ids, cfg, Reward(costly, "costly", every_n_tokens=2))
    assert res.stats.steps == 8
    # due after 2, 4, 6 and 8 committed tokens, plus the final rescoring of the unfinished beam
    assert len(calls) == 4 + 1


def test_every_n_tokens_reward_runs_in_segment_mode(no_eos_model, tiny_tokenizer, prompt_ids):
    calls = []

    def costly(prompts, completions):
        calls.append(len(completions))
        return [len(c) for c in completions]

    # segments of 2 tokens: a reward due every 2 generated tokens is due at every step
    cfg = SearchConfig(mode="segment", beam=2, topk=2, lookahead=1, max_new_tokens=8)
    res = search(HFBackend(no_eos_model, tiny_tokenizer), prompt_ids, cfg, Reward(costly, "costly", every_n_tokens=2))
    assert res.stats.steps == 4
    assert len(calls) >= res.stats.steps  # due at every step, so it steers the search


# devices ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_search_runs_on_a_cuda_model(tiny_tokenizer, prompt_ids):
    from conftest import build_model

    cpu = build_model(tiny_tokenizer)
    gpu = build_model(tiny_tokenizer).to("cuda")
    for cfg in (
        SearchConfig(strategy="greedy", max_new_tokens=6),
        SearchConfig(mode="token", beam=2, topk=3, lookahead=2, max_new_tokens=6),
        SearchConfig(mode="segment", beam=2, topk=3, lookahead=2, max_new_tokens=6),
    ):
        a = search(HFBackend(cpu, tiny_tokenizer), prompt_ids, cfg, letters)
        b = search(HFBackend(gpu, tiny_tokenizer), prompt_ids, cfg, letters)
        assert a.best.token_ids == b.best.token_ids


# the opening schedule ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["token", "segment"])
def test_opening_schedule_widens_only_the_first_tokens(no_eos_model, tiny_tokenizer, prompt_ids, mode):
    widths = []

    def record(prompts, texts):
        widths.append(len(texts))
        return [0.0] * len(texts)

    cfg = SearchConfig(mode=mode, beam=2, topk=1, lookahead=2, lam=1.0, max_new_tokens=9,
                       open_tokens=3, open_topk=5, open_lookahead=1, early_stop=False)
    res = search(fast(no_eos_model, tiny_tokenizer), prompt_ids, cfg, Reward(record, "record"))
    # three opening steps (1 state x 5, then 2 states x 5), then 2 states x top-1
    assert widths[:3] == [5, 10, 10]
    assert set(widths[3:]) == {2}
    # the last call rescores the final beam on its own text (nothing finishes with this model)
    if mode == "token":
        assert len(widths) == 9 + 1  # one token per step throughout
    else:  # after the opening, each step commits the candidate and its 2 lookahead tokens: 3 + 3 + 3
        assert len(widths) == 3 + 2 + 1
    assert len(res.best.token_ids) == 9 and res.stats.steps == len(widths) - 1


def test_opening_schedule_off_changes_nothing(tiny_model, tiny_tokenizer, prompt_ids):
    base = SearchConfig(mode="token", beam=2, topk=3, lookahead=1, lam=2.0, max_new_tokens=6)
    off = base.replace(open_topk=7, open_lookahead=4)  # open_tokens 0: the opening's settings are not read
    a = search(fast(tiny_model, tiny_tokenizer), prompt_ids, base, letters)
    b = search(fast(tiny_model, tiny_tokenizer), prompt_ids, off, letters)
    assert a.best.token_ids == b.best.token_ids and a.stats.candidates_scored == b.stats.candidates_scored


def test_beam_search_ignores_the_opening_schedule(tiny_model, tiny_tokenizer, prompt_ids):
    cfg = SearchConfig(strategy="beam", beam=3, max_new_tokens=6)
    a = search(fast(tiny_model, tiny_tokenizer), prompt_ids, cfg)
    b = search(fast(tiny_model, tiny_tokenizer), prompt_ids, cfg.replace(open_tokens=4, open_topk=8))
    assert a.best.token_ids == b.best.token_ids


@pytest.mark.parametrize("changes, message", [
    ({"open_tokens": 9, "max_new_tokens": 8}, "does not fit the token budget: open_tokens 9 > max_new_tokens 8"),
    ({"open_tokens": 2, "mode": "segment", "fluency": 0.5}, "opening schedule before segment mode needs fluency 0"),
    ({"open_tokens": -1}, "open_tokens must be an integer >= 0"),
    ({"open_topk": 0}, "open_topk must be an integer >= 1"),
    ({"open_lookahead": -2}, "open_lookahead must be an integer >= 0"),
])
def test_a_bad_opening_schedule_is_a_one_line_error(changes, message):
    from dealign.errors import ConfigError

    with pytest.raises(ConfigError, match=message) as err:
        SearchConfig(**changes)
    assert "\n" not in str(err.value)
