"""The fluency term of DeAL's objective on tiny random models: rows of two prompts in one batch
(left padding), rows that follow another row's tokens, equality with the one-row-at-a-time oracle,
the score formula, its cost in forward passes, and the errors a user can cause."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from dealign.backends.hf import HFBackend, NaiveHFBackend
from dealign.cli.main import app
from dealign.rewards import as_reward, keywords
from dealign.search import ConfigError, SearchConfig, run_search

from conftest import PROMPT, SEARCH_CONFIGS  # noqa: E402

CONTEXT = "a cat"


def sequence_logprob(model, prompt_ids, answer) -> float:
    ids = list(prompt_ids) + list(answer)
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return float(sum(lp[len(prompt_ids) - 1 + i, t] for i, t in enumerate(answer)))


@pytest.fixture(scope="module")
def ids(tiny_tokenizer):
    return tiny_tokenizer.encode(PROMPT), tiny_tokenizer.encode(CONTEXT)


# backend: ragged rows, followers ------------------------------------------------------------------------------


def test_a_padded_row_computes_what_it_would_alone(tiny_model, tiny_tokenizer, ids):
    long, short = tiny_tokenizer.encode("the dog catches a red frisbee in the park"), ids[1]
    backend = HFBackend(tiny_model, tiny_tokenizer)
    both = backend.prefill_many([long, short])
    alone = [backend.prefill(long), backend.prefill(short)]
    for r in range(2):
        assert torch.allclose(both.next_logprobs[r], alone[r].next_logprobs[0], atol=1e-4)
    # and after a rollout and a commit the padded row still matches its own prompt read alone
    forced = torch.tensor([[5], [5]])
    ro = backend.rollout(both, [0, 1], forced, 2, feed_last=True)
    ro_alone = backend.rollout(alone[1], [0], forced[:1], 2, feed_last=True)
    assert torch.allclose(ro.logprobs[1], ro_alone.logprobs[0], atol=1e-4)
    assert ro.tokens[1].tolist() == ro_alone.tokens[0].tolist()
    nxt = backend.commit(ro, [1], 3)
    assert torch.allclose(nxt.next_logprobs[0], backend.commit(ro_alone, [0], 3).next_logprobs[0], atol=1e-4)


def test_followers_take_their_leaders_tokens_and_score_them_under_their_own_prompt(tiny_model, tiny_tokenizer, ids):
    prompt, context = ids
    fast, naive = HFBackend(tiny_model, tiny_tokenizer), NaiveHFBackend(tiny_model, tiny_tokenizer)
    forced = torch.tensor([[5], [7], [5], [7]])
    outs = []
    for backend in (fast, naive):
        beam = backend.prefill_many([prompt, context])
        outs.append(backend.rollout(beam, [0, 0, 1, 1], forced, 3, feed_last=True, follow=[0, 1, 0, 1]))
    for ro in outs:
        assert ro.tokens[2].tolist() == ro.tokens[0].tolist() and ro.tokens[3].tolist() == ro.tokens[1].tolist()
        # row 2's log-probs are the leader's tokens read after the context
        assert ro.logprobs[2].sum().item() == pytest.approx(sequence_logprob(tiny_model, context, ro.tokens[0].tolist()), abs=1e-3)
    assert torch.allclose(outs[0].logprobs, outs[1].logprobs, atol=1e-4)


def test_sampled_followers_leave_the_leaders_random_stream_alone(tiny_model, tiny_tokenizer, ids):
    from dealign.backends.base import Sampler

    backend = HFBackend(tiny_model, tiny_tokenizer)
    alone = backend.rollout(backend.prefill(ids[0]), [0, 0], torch.tensor([[5], [7]]), 4,
                            sampler=Sampler(1.0, generator=torch.Generator().manual_seed(3)))
    both = backend.rollout(backend.prefill_many(list(ids)), [0, 0, 1, 1], torch.tensor([[5], [7], [5], [7]]), 4,
                           sampler=Sampler(1.0, generator=torch.Generator().manual_seed(3)), follow=[0, 1, 0, 1])
    assert both.tokens[:2].tolist() == alone.tokens.tolist()


def test_follow_must_point_at_leaders(tiny_model, tiny_tokenizer, ids):
    backend = HFBackend(tiny_model, tiny_tokenizer)
    with pytest.raises(ValueError, match="follow"):
        backend.rollout(backend.prefill(ids[0]), [0, 0], torch.tensor([[5], [7]]), 2, follow=[1, 0])


# the search -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SEARCH_CONFIGS))
def test_fluency_search_equals_the_one_row_at_a_time_oracle(tiny_model, tiny_tokenizer, ids, name):
    cfg = SEARCH_CONFIGS[name].replace(fluency=0.7)
    reward = as_reward(keywords(["dog", "park"]))
    a = run_search(HFBackend(tiny_model, tiny_tokenizer), ids[0], reward, cfg, prompt_text=PROMPT, fluency_ids=ids[1])
    b = run_search(NaiveHFBackend(tiny_model, tiny_tokenizer), ids[0], reward, cfg, prompt_text=PROMPT, fluency_ids=ids[1])
    assert a.best.token_ids == b.best.token_ids
    assert a.best.score == pytest.approx(b.best.score, abs=1e-3)
    assert a.best.fluency == pytest.approx(b.best.fluency, abs=1e-3)


@pytest.mark.parametrize("mode", ["token", "segment"])
def test_the_score_adds_the_answers_logprob_in_the_neutral_context(tiny_model, tiny_tokenizer, ids, mode):
    cfg = SearchConfig(mode=mode, beam=2, topk=3, lookahead=2, lam=2.0, fluency=0.5, max_new_tokens=6)
    reward = as_reward(keywords(["dog"]))
    res = run_search(HFBackend(tiny_model, tiny_tokenizer), ids[0], reward, cfg, prompt_text=PROMPT, fluency_ids=ids[1])
    best = res.best
    assert best.logprob == pytest.approx(sequence_logprob(tiny_model, ids[0], best.token_ids), abs=1e-3)
    assert best.fluency == pytest.approx(sequence_logprob(tiny_model, ids[1], best.token_ids), abs=1e-3)
    assert best.score == pytest.approx(best.logprob + 0.5 * best.fluency + 2.0 * best.reward, abs=1e-3)


def test_fluency_changes_the_ranking_and_zero_is_todays_search(tiny_model, tiny_tokenizer, ids):
    backend = HFBackend(tiny_model, tiny_tokenizer)
    cfg = SearchConfig(beam=2, topk=4, lookahead=1, lam=1.0, max_new_tokens=8)
    reward = as_reward(keywords(["dog"]))
    plain = run_search(backend, ids[0], reward, cfg, prompt_text=PROMPT)
    zero = run_search(backend, ids[0], reward, cfg.replace(fluency=0.0), prompt_text=PROMPT, fluency_ids=ids[1])
    assert zero.best.token_ids == plain.best.token_ids and zero.best.fluency == 0.0
    # a heavy fluency weight makes the answer the context's own most likely continuation, not the prompt's
    heavy = run_search(backend, ids[0], reward, cfg.replace(fluency=50.0, lam=0.0), prompt_text=PROMPT, fluency_ids=ids[1])
    ctx_first = int(backend.prefill(ids[1]).next_logprobs[0].topk(4).indices[0])
    prompt_top = backend.prefill(ids[0]).next_logprobs[0].topk(4).indices.tolist()
    if ctx_first in prompt_top:  # the context's favourite is among the prompt's candidates
        assert heavy.best.token_ids[0] == ctx_first


@pytest.mark.parametrize("mode, extra_rows", [("token", 2), ("segment", 6)])
def test_fluency_costs_rows_not_sequential_forward_passes(tiny_model, tiny_tokenizer, ids, mode, extra_rows):
    backend = HFBackend(tiny_model, tiny_tokenizer)
    cfg = SearchConfig(mode=mode, beam=2, topk=3, lookahead=1, lam=1.0, max_new_tokens=8)
    reward = as_reward(keywords(["dog"]))
    plain = run_search(backend, ids[0], reward, cfg, prompt_text=PROMPT)
    backend.counters.rows_max = 0
    res = run_search(backend, ids[0], reward, cfg.replace(fluency=1.0), prompt_text=PROMPT, fluency_ids=ids[1])
    per_step = 1 if mode == "token" else 2  # the candidate's forward (and the segment's last token)
    for r in (plain, res):
        assert r.stats.forward_passes <= 1 + per_step * r.stats.steps  # the prefill, then the steps
    # the context's rows ride along: one per state in token mode (lagging one token), a twin per candidate in segment mode
    assert backend.counters.rows_max == 2 * 3 + extra_rows


def test_the_aligner_reads_the_answer_after_the_fluency_prompt(tiny_aligner):
    res = tiny_aligner.generate(PROMPT, reward=keywords(["dog"]), fluency=0.8, fluency_prompt="a cat", max_new_tokens=6,
                                beam=2, topk=3)
    ctx, _ = tiny_aligner.encode_prompt("a cat")
    assert res.fluency == pytest.approx(sequence_logprob(tiny_aligner.backend.model, ctx, res.token_ids), abs=1e-3)
    assert res.beam and all("fluency" in h for h in res.beam)
    # greedy, sampling, best-of-n and beam search ignore the setting
    g = tiny_aligner.generate(PROMPT, strategy="greedy", fluency=0.8, max_new_tokens=6)
    assert g.fluency == 0.0


# errors --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-0.5, float("nan"), "high", True])
def test_a_bad_fluency_weight_is_refused(bad):
    with pytest.raises(ConfigError, match="fluency"):
        SearchConfig(fluency=bad)


def test_an_empty_fluency_prompt_is_refused():
    with pytest.raises(ConfigError, match="fluency_prompt"):
        SearchConfig(fluency_prompt="  ")


def test_fluency_without_a_context_or_with_a_draft_is_a_clear_error(tiny_model, tiny_draft, tiny_tokenizer, ids):
    backend = HFBackend(tiny_model, tiny_tokenizer)
    cfg = SearchConfig(fluency=1.0, max_new_tokens=4)
    with pytest.raises(ConfigError, match="fluency_ids"):
        run_search(backend, ids[0], None, cfg)
    with pytest.raises(ConfigError, match="draft"):
        run_search(backend, ids[0], None, cfg, fluency_ids=ids[1], draft=HFBackend(tiny_draft, tiny_tokenizer))


def test_cli_and_batch_fields_check_the_fluency_weight(tiny_model_dir, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["generate", "the dog", "--model", str(tiny_model_dir), "--fluency", "-1"])
    assert res.exit_code == 2 and "fluency" in res.output and "Traceback" not in res.output
    assert res.output.strip().count("\n") == 0
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"prompt": "the dog", "max_new_tokens": 4}) + "\n"
                   + json.dumps({"prompt": "the dog", "fluency": "high"}) + "\n")
    res = runner.invoke(app, ["generate", "--input", str(inp), "--output", str(out), "--model", str(tiny_model_dir)])
    assert res.exit_code == 2 and "fluency must be a number" in res.output and "line 2" in res.output
    assert not out.exists()  # every line is checked before the model loads or anything is written
    ok = runner.invoke(app, ["generate", "the dog", "--model", str(tiny_model_dir), "--fluency", "0.5",
                             "--fluency-prompt", "a cat", "--max-new-tokens", "4", "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["fluency"] < 0


def test_a_tokenizer_that_cannot_decode_is_refused_in_one_line(tiny_model, tiny_tokenizer):
    from dealign import Aligner

    class Broken:
        def __getattr__(self, name):
            return getattr(tiny_tokenizer, name)

        def encode(self, text, **kw):
            return tiny_tokenizer.encode(text, **kw)

        def decode(self, ids, **kw):
            raise TypeError("no decoder")

    with pytest.raises(ValueError, match="cannot decode token ids to text") as err:
        Aligner.from_model(tiny_model, Broken(), name="broken")
    assert "\n" not in str(err.value)
