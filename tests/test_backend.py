"""The backend contract: one prefill, batched rollouts equal to the one-row-at-a-time oracle, commits
that reuse (and do not corrupt) the forked KV cache, end-of-sequence handling and the sampler."""

from __future__ import annotations

import pytest
import torch

from dealign.backends.base import Beam, Sampler, top_p_mask
from dealign.backends.hf import HFBackend, NaiveHFBackend

from conftest import EosBoost  # noqa: E402


@pytest.fixture()
def fast(tiny_model, tiny_tokenizer):
    return HFBackend(tiny_model, tiny_tokenizer)


@pytest.fixture()
def naive(tiny_model, tiny_tokenizer):
    return NaiveHFBackend(tiny_model, tiny_tokenizer)


def full_next_logprobs(model, ids_rows) -> torch.Tensor:
    """The next-token log-distribution of each sequence, from a fresh forward without a cache."""
    with torch.no_grad():
        out = []
        for ids in ids_rows:
            logits = model(input_ids=torch.tensor([list(ids)])).logits
            out.append(torch.log_softmax(logits[0, -1].float(), -1))
    return torch.stack(out)


def top_tokens(beam: Beam, parents, k_index) -> torch.Tensor:
    """Forced first tokens: for each parent, its ``k_index[i]``-th most likely next token."""
    order = beam.next_logprobs.argsort(dim=-1, descending=True)
    return torch.tensor([[int(order[p, k])] for p, k in zip(parents, k_index)])


def assert_same_rollout(a, b, *, check_n_fed=True):
    assert a.tokens.shape == b.tokens.shape
    assert a.length == b.length
    assert a.finished == b.finished
    for r, n in enumerate(a.length):  # only the tokens that count must agree
        assert a.tokens[r, :n].tolist() == b.tokens[r, :n].tolist()
        torch.testing.assert_close(a.logprobs[r, :n], b.logprobs[r, :n], atol=1e-4, rtol=1e-4)
    if check_n_fed:
        assert a.n_fed == b.n_fed


# prefill ---------------------------------------------------------------------------------------------


def test_prefill_encodes_the_prompt_once(fast, tiny_model, prompt_ids):
    beam = fast.prefill(prompt_ids)
    assert fast.counters.forward_passes == 1
    assert fast.counters.tokens_processed == len(prompt_ids)
    assert beam.ids == [list(prompt_ids)]
    assert beam.next_logprobs.shape == (1, fast.vocab_size)
    torch.testing.assert_close(beam.next_logprobs, full_next_logprobs(tiny_model, [prompt_ids]), atol=1e-5, rtol=1e-5)
    # the next distribution is a normalised log-distribution
    torch.testing.assert_close(beam.next_logprobs.exp().sum(-1), torch.ones(1), atol=1e-4, rtol=0)


def test_a_prompt_that_starts_like_a_cached_one_feeds_only_its_rest(tiny_model, tiny_tokenizer):
    """The prefix cache: an exact repeat costs no forward, a shared opening is not re-read, and the
    beams (and what is decoded from them) are those of a backend without the cache."""
    plain = HFBackend(tiny_model, tiny_tokenizer)
    assert plain.prefixes is None  # off unless asked for: a library call's answer never depends on earlier ones
    cached = plain.with_prefix_cache(64)
    enc = lambda t: tiny_tokenizer.encode(t)  # noqa: E731
    a = enc("the dog runs on the beach with a ball and the cat sleeps")
    b = enc("the dog runs on the beach with a ball and a man throws it")
    common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert common >= 8
    cached.prefill(a)
    before = cached.counters.snapshot()
    beam_b = cached.prefill(b)
    assert cached.counters.tokens_processed - before["tokens_processed"] == len(b) - common
    beam_a = cached.prefill(a)
    assert cached.counters.tokens_processed - before["tokens_processed"] == len(b) - common  # a repeat: no forward
    assert cached.prefixes.hits == 2 and cached.prefixes.tokens_saved == common + len(a)
    many = cached.prefill_many([b, enc("children sit"), a])  # hit, miss, hit in one beam
    for got, ids in ((beam_b, [b]), (beam_a, [a]), (many, [b, enc("children sit"), a])):
        want = plain.prefill_many(ids) if len(ids) > 1 else plain.prefill(ids[0])
        torch.testing.assert_close(got.next_logprobs, want.next_logprobs, atol=1e-5, rtol=1e-5)
        rows = list(range(len(ids)))
        forced = got.next_logprobs.argmax(-1)[:, None]
        assert_same_rollout(cached.rollout(got, rows, forced, 4), plain.rollout(want, rows, forced, 4))


def test_the_prefix_cache_stays_within_its_bytes(tiny_model, tiny_tokenizer):
    backend = HFBackend(tiny_model, tiny_tokenizer, prefix_cache_mb=0.02)
    for word in ("dog", "cat", "ball", "man", "sea", "sun", "tree", "car"):
        backend.prefill(tiny_tokenizer.encode(f"a {word} " * 6))
    assert 0 < len(backend.prefixes) < 8
    assert backend.prefixes.nbytes <= 0.02 * 2**20


def test_prefill_rejects_an_empty_prompt(fast, naive):
    for backend in (fast, naive):
        with pytest.raises(ValueError, match="no tokens"):
            backend.prefill([])


def test_backend_knows_eos_and_vocab(fast, tiny_tokenizer):
    assert tiny_tokenizer.eos_token_id in fast.eos_ids
    assert fast.vocab_size == len(tiny_tokenizer)


# rollout == the one-row-at-a-time oracle --------------------------------------------------------------


@pytest.mark.parametrize("feed_last", [False, True])
@pytest.mark.parametrize("steps", [0, 1, 4])
def test_rollout_matches_naive_oracle(fast, naive, prompt_ids, steps, feed_last):
    fb, nb = fast.prefill(prompt_ids), naive.prefill(prompt_ids)
    torch.testing.assert_close(fb.next_logprobs, nb.next_logprobs, atol=1e-5, rtol=1e-5)
    parents = [0, 0, 0, 0]
    forced = top_tokens(fb, parents, [0, 1, 2, 5])
    fr = fast.rollout(fb, parents, forced, steps, feed_last=feed_last)
    nr = naive.rollout(nb, parents, forced, steps, feed_last=feed_last)
    assert fr.tokens.shape == (4, 1 + steps)
    assert fr.tokens[:, 0].tolist() == forced[:, 0].tolist()
    assert_same_rollout(fr, nr)
    # log-prob of the forced token is read from the parent's distribution
    torch.testing.assert_close(fr.logprobs[:, 0], fb.next_logprobs[0, forced[:, 0]], atol=1e-6, rtol=0)


@pytest.mark.parametrize("feed_last", [False, True])
def test_rollout_from_a_multi_row_beam_with_repeated_parents(fast, naive, prompt_ids, feed_last):
    """Commit two rows, then roll out with parents (1, 0, 1, 1): both backends agree, rows are
    independent (the same parent + forced token gives the same row)."""
    fb, nb = fast.prefill(prompt_ids), naive.prefill(prompt_ids)
    forced = top_tokens(fb, [0, 0, 0], [0, 1, 2])
    fr = fast.rollout(fb, [0, 0, 0], forced, 3)
    nr = naive.rollout(nb, [0, 0, 0], forced, 3)
    f2, n2 = fast.commit(fr, [2, 0], 2), naive.commit(nr, [2, 0], 2)
    assert f2.ids == n2.ids
    assert f2.ids[0] == list(prompt_ids) + fr.tokens[2, :2].tolist()
    torch.testing.assert_close(f2.next_logprobs, n2.next_logprobs, atol=1e-4, rtol=1e-4)

    parents = [1, 0, 1, 1]
    forced2 = top_tokens(f2, parents, [0, 0, 1, 0])
    assert forced2[0].tolist() == forced2[3].tolist()  # a duplicated row
    fr2 = fast.rollout(f2, parents, forced2, 4, feed_last=feed_last)
    nr2 = naive.rollout(n2, parents, forced2, 4, feed_last=feed_last)
    assert_same_rollout(fr2, nr2)
    assert fr2.tokens[0].tolist() == fr2.tokens[3].tolist()
    torch.testing.assert_close(fr2.logprobs[0], fr2.logprobs[3])


@pytest.mark.parametrize("width", [2, 3])
def test_rollout_with_several_forced_tokens_matches_oracle(fast, naive, prompt_ids, width):
    """Segment scoring forces a whole chunk: every forced token's log-prob comes from one forward."""
    fb, nb = fast.prefill(prompt_ids), naive.prefill(prompt_ids)
    g = torch.Generator().manual_seed(0)
    forced = torch.randint(1, fast.vocab_size, (3, width), generator=g)  # id 0 is EOS: avoid it
    before = fast.counters.forward_passes
    fr = fast.rollout(fb, [0, 0, 0], forced, 0)
    assert fast.counters.forward_passes - before == 1
    nr = naive.rollout(nb, [0, 0, 0], forced, 0)
    assert fr.n_fed == width
    assert_same_rollout(fr, nr)
    cf, cn = fast.commit(fr, [1, 2], width), naive.commit(nr, [1, 2], width)
    torch.testing.assert_close(cf.next_logprobs, cn.next_logprobs, atol=1e-4, rtol=1e-4)


def test_rollout_is_one_batched_forward_per_token(fast, prompt_ids):
    beam = fast.prefill(prompt_ids)
    for rows in (1, 6):
        forced = top_tokens(beam, [0] * rows, list(range(rows)))
        before = fast.counters.snapshot()
        ro = fast.rollout(beam, [0] * rows, forced, 3)
        after = fast.counters.snapshot()
        assert not any(ro.finished)
        # forced token + 2 generated tokens fed (the last generated one is not fed), all rows at once
        assert after["forward_passes"] - before["forward_passes"] == 3
        assert after["tokens_processed"] - before["tokens_processed"] == 3 * rows
        assert ro.n_fed == 3
        ro = fast.rollout(beam, [0] * rows, forced, 3, feed_last=True)
        assert ro.n_fed == 4


# commit: the cropped forked cache ---------------------------------------------------------------------


@pytest.mark.parametrize("feed_last", [False, True])
def test_commit_next_logprobs_match_a_fresh_forward(fast, tiny_model, prompt_ids, feed_last):
    beam = fast.prefill(prompt_ids)
    forced = top_tokens(beam, [0, 0, 0], [0, 1, 3])
    ro = fast.rollout(beam, [0, 0, 0], forced, 4, feed_last=feed_last)
    assert not any(ro.finished)
    assert ro.n_fed == (5 if feed_last else 4)
    for keep in sorted({1, 2, ro.n_fed}):
        nb = fast.commit(ro, [2, 0], keep)
        assert nb.ids == [list(prompt_ids) + ro.tokens[r, :keep].tolist() for r in (2, 0)]
        torch.testing.assert_close(nb.next_logprobs, full_next_logprobs(tiny_model, nb.ids), atol=1e-4, rtol=1e-4)
        # the cache really holds prompt + kept tokens: the next rollout agrees with a fresh forward
        nxt = nb.next_logprobs.argmax(-1)[:, None]
        ro2 = fast.rollout(nb, [0, 1], nxt, 0)
        b2 = fast.commit(ro2, [0, 1], 1)
        torch.testing.assert_close(b2.next_logprobs, full_next_logprobs(tiny_model, b2.ids), atol=1e-4, rtol=1e-4)


def test_commit_rejects_keep_out_of_range(fast, prompt_ids):
    beam = fast.prefill(prompt_ids)
    ro = fast.rollout(beam, [0], top_tokens(beam, [0], [0]), 2)
    with pytest.raises(ValueError):
        fast.commit(ro, [0], 0)
    with pytest.raises(ValueError):
        fast.commit(ro, [0], ro.n_fed + 1)


def test_forking_leaves_the_parent_cache_untouched(fast, prompt_ids):
    beam = fast.prefill(prompt_ids)
    state_len = beam.state.kv.get_seq_length()
    forced = top_tokens(beam, [0, 0], [0, 1])
    first = fast.rollout(beam, [0, 0], forced, 5, feed_last=True)
    # commits crop a fork of the rollout's cache, not the rollout's cache itself
    fast.commit(first, [0], 1)
    fast.commit(first, [1, 0], first.n_fed)
    second = fast.rollout(beam, [0, 0], forced, 5, feed_last=True)
    assert beam.state.kv.get_seq_length() == state_len
    assert torch.equal(first.tokens, second.tokens)
    assert torch.equal(first.logprobs, second.logprobs)
    # the rollout's own cache survived both commits: committing again still gives the right beam
    again = fast.commit(first, [1], first.n_fed)
    ref = fast.commit(second, [1], second.n_fed)
    assert again.ids == ref.ids
    torch.testing.assert_close(again.next_logprobs, ref.next_logprobs)


def test_commit_of_a_committed_beam_chain_matches_oracle(fast, naive, prompt_ids):
    """Three steps of rollout + commit (token-mode style, keep=1) stay equal to the oracle."""
    fb, nb = fast.prefill(prompt_ids), naive.prefill(prompt_ids)
    for step in range(3):
        rows = len(fb)
        parents = [r for r in range(rows) for _ in range(2)]
        forced = top_tokens(fb, parents, [0, 1] * rows)
        fr = fast.rollout(fb, parents, forced, 2)
        nr = naive.rollout(nb, parents, forced, 2)
        assert_same_rollout(fr, nr)
        keep_rows = [len(parents) - 1, 0]
        fb, nb = fast.commit(fr, keep_rows, 1), naive.commit(nr, keep_rows, 1)
        assert fb.ids == nb.ids
        torch.testing.assert_close(fb.next_logprobs, nb.next_logprobs, atol=1e-4, rtol=1e-4)


# end of sequence --------------------------------------------------------------------------------------


def test_forced_eos_finishes_the_row_and_pads_the_rest(fast, naive, prompt_ids, tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    fb, nb = fast.prefill(prompt_ids), naive.prefill(prompt_ids)
    other = int(fb.next_logprobs[0].argmax()) if int(fb.next_logprobs[0].argmax()) != eos else 5
    forced = torch.tensor([[other], [eos], [other]])
    for backend, beam in ((fast, fb), (naive, nb)):
        ro = backend.rollout(beam, [0, 0, 0], forced, 4)
        assert ro.finished[1] is True
        assert ro.length[1] == 1
        assert ro.tokens[1, 1:].tolist() == [min(backend.eos_ids)] * 4  # padding
        assert ro.logprobs[1, 1:].abs().sum() == 0
        assert ro.tokens[1, 0] == eos
        torch.testing.assert_close(ro.logprobs[1, 0], beam.next_logprobs[0, eos])
        # the other rows are untouched by their neighbour finishing
        assert ro.tokens[0].tolist() == ro.tokens[2].tolist()
        assert ro.length[0] == 5 or ro.finished[0]


def test_rollout_stops_early_when_every_row_is_finished(fast, prompt_ids, tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    beam = fast.prefill(prompt_ids)
    before = fast.counters.forward_passes
    ro = fast.rollout(beam, [0, 0], torch.tensor([[eos], [eos]]), 6, feed_last=True)
    assert fast.counters.forward_passes - before <= 1  # no generation steps at all
    assert ro.finished == [True, True]
    assert ro.length == [1, 1]
    assert ro.tokens.shape == (2, 7)
    assert ro.tokens[:, 1:].eq(min(fast.eos_ids)).all()


def test_generated_eos_finishes_rows_and_stops_the_rollout(tiny_model, tiny_tokenizer, prompt_ids):
    """A model that says EOS from the 3rd generated token on: rows end there, the rollout stops
    instead of running all 8 steps, and both backends agree."""
    eos = tiny_tokenizer.eos_token_id
    P = len(prompt_ids)
    model = EosBoost(tiny_model, eos, 50.0, from_pos=P + 2)
    fast, naive = HFBackend(model, tiny_tokenizer), NaiveHFBackend(model, tiny_tokenizer)
    fb, nb = fast.prefill(prompt_ids), naive.prefill(prompt_ids)
    forced = top_tokens(fb, [0, 0, 0], [0, 1, 2])
    assert eos not in forced[:, 0].tolist()
    before = fast.counters.forward_passes
    fr = fast.rollout(fb, [0, 0, 0], forced, 8, feed_last=True)
    passes = fast.counters.forward_passes - before
    nr = naive.rollout(nb, [0, 0, 0], forced, 8, feed_last=True)
    assert fr.finished == [True, True, True]
    assert fr.length == [3, 3, 3]
    assert fr.tokens[:, 2].eq(eos).all()
    assert fr.tokens[:, 3:].eq(min(fast.eos_ids)).all()
    assert fr.logprobs[:, 3:].eq(0).all()
    assert passes == 2  # the forced token and the 1st generated one; then every row is done
    assert_same_rollout(fr, nr, check_n_fed=False)


def test_eos_ids_come_from_generation_config_and_tokenizer(tiny_model, tiny_tokenizer):
    import copy

    model = copy.copy(tiny_model)
    model.generation_config = copy.deepcopy(tiny_model.generation_config)
    model.generation_config.eos_token_id = [7, 9]
    backend = HFBackend(model, tiny_tokenizer)
    assert backend.eos_ids == frozenset({7, 9, tiny_tokenizer.eos_token_id})


# sampler ----------------------------------------------------------------------------------------------


def test_sampler_greedy_is_argmax():
    lp = torch.log_softmax(torch.randn(5, 40, generator=torch.Generator().manual_seed(1)), -1)
    assert torch.equal(Sampler().pick(lp), lp.argmax(-1))


@pytest.mark.parametrize("top_p", [1e-9, 0.05, 0.3])
def test_top_p_mask_keeps_the_top_token(top_p):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 50, generator=g) * 4
    masked = top_p_mask(logits, top_p)
    top = logits.argmax(-1)
    assert torch.isfinite(masked.gather(1, top[:, None])).all()
    torch.testing.assert_close(masked.gather(1, top[:, None]), logits.gather(1, top[:, None]))
    if top_p == 1e-9:  # only the top token survives
        assert torch.isfinite(masked).sum(-1).eq(1).all()


def test_top_p_mask_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.1, 0.5, 0.25, 0.15]])
    logits = probs.log()
    kept = torch.isfinite(top_p_mask(logits, 0.6))[0].tolist()
    assert kept == [False, True, True, False]  # 0.5 < 0.6, 0.5 + 0.25 >= 0.6
    kept = torch.isfinite(top_p_mask(logits, 0.45))[0].tolist()
    assert kept == [False, True, False, False]
    kept = torch.isfinite(top_p_mask(logits, 0.95))[0].tolist()
    assert kept == [True, True, True, True]


def test_sampler_respects_top_p():
    probs = torch.tensor([[0.1, 0.5, 0.25, 0.15]]).expand(400, -1)
    s = Sampler(temperature=1.0, top_p=0.6, generator=torch.Generator().manual_seed(0))
    picks = s.pick(probs.log())
    assert set(picks.tolist()) == {1, 2}


def test_seeded_sampling_is_reproducible():
    lp = torch.log_softmax(torch.randn(6, 64, generator=torch.Generator().manual_seed(3)), -1)

    def draws(seed):
        s = Sampler(temperature=0.9, top_p=0.9, generator=torch.Generator().manual_seed(seed))
        return torch.stack([s.pick(lp) for _ in range(20)])

    a, b, c = draws(11), draws(11), draws(12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_seeded_sampled_rollout_is_reproducible(fast, prompt_ids):
    beam = fast.prefill(prompt_ids)
    forced = top_tokens(beam, [0, 0, 0], [0, 1, 2])

    def run(seed):
        s = Sampler(temperature=1.2, generator=torch.Generator().manual_seed(seed))
        return fast.rollout(beam, [0, 0, 0], forced, 6, sampler=s)

    a, b = run(5), run(5)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.logprobs, b.logprobs)
    greedy = fast.rollout(beam, [0, 0, 0], forced, 6)
    others = [run(s).tokens for s in range(6, 10)]
    assert any(not torch.equal(t, greedy.tokens) for t in others)
