"""Several start states searched together (``instruction`` as a list; ``deal_search``'s ``starts``) on
tiny random models: equality with the one-row-at-a-time oracle over ragged prompts, every answer read
with the log-prob of its own start, the reward choosing the start, and clear errors where a strategy
or backend cannot hold several."""

from __future__ import annotations

import math

import pytest

from dealign.backends.hf import HFBackend, NaiveHFBackend
from dealign.errors import ConfigError, UsageError
from dealign.rewards import as_reward
from dealign.search import SearchConfig, run_search
from dealign.settings import Settings

from conftest import PROMPT, letters  # noqa: E402
from test_search import sequence_logprob  # noqa: E402

OTHER = "a cat sat on the warm mat and then the cat"  # longer than PROMPT: the start states are ragged


def _first_token(backend, ids) -> int:
    return int(backend.prefill(ids).next_logprobs[0].argmax())


@pytest.mark.parametrize("fluency", [0.0, 1.0])
@pytest.mark.parametrize("mode", ["token", "segment"])
def test_several_starts_equal_the_naive_oracle_and_read_each_answer_under_its_own_start(tiny_model, tiny_tokenizer, mode,
                                                                                       fluency):
    a_ids, b_ids = tiny_tokenizer.encode(PROMPT), tiny_tokenizer.encode(OTHER)
    assert len(a_ids) != len(b_ids)
    model = tiny_model  # (a position-based EOS boost would differ between the ragged prompts' padded columns)
    cfg = SearchConfig(mode=mode, beam=3, topk=2, lookahead=2, lam=1.0, max_new_tokens=7, fluency=fluency)
    kw = dict(prompt_text=PROMPT, starts=[b_ids], fluency_ids=tiny_tokenizer.encode("write one sentence") if fluency else None)
    fast = run_search(HFBackend(model, tiny_tokenizer), a_ids, as_reward(letters), cfg, **kw)
    naive = run_search(NaiveHFBackend(model, tiny_tokenizer), a_ids, as_reward(letters), cfg, **kw)
    assert fast.best.token_ids == naive.best.token_ids and fast.best.start == naive.best.start
    assert [h.token_ids for h in fast.beam] == [h.token_ids for h in naive.beam]
    assert [h.start for h in fast.beam] == [h.start for h in naive.beam]
    assert math.isclose(fast.best.score, naive.best.score, rel_tol=1e-4, abs_tol=1e-4)
    for h in fast.beam + [fast.best]:
        own = (a_ids, b_ids)[h.start]
        assert math.isclose(h.logprob, sequence_logprob(model, own, h.token_ids), rel_tol=1e-3, abs_tol=1e-3)


def test_the_reward_chooses_the_start_state(tiny_model, tiny_tokenizer):
    """Top-1 actions: a token only one start proposes first can only come from that start."""
    backend = HFBackend(tiny_model, tiny_tokenizer)
    a_ids, b_ids = tiny_tokenizer.encode(PROMPT), tiny_tokenizer.encode(OTHER)
    a_tok, b_tok = _first_token(backend, a_ids), _first_token(backend, b_ids)
    assert a_tok != b_tok
    cfg = SearchConfig(beam=2, topk=1, lookahead=1, lam=100.0, max_new_tokens=4)

    def starts_with(token):
        return as_reward(lambda prompts, texts: [1.0 if t.startswith(backend.decode([token])) else 0.0 for t in texts])

    for token, start in ((b_tok, 1), (a_tok, 0)):
        res = run_search(backend, a_ids, starts_with(token), cfg, prompt_text=PROMPT, starts=[b_ids])
        assert res.best.start == start and res.best.token_ids[0] == token
    alone = run_search(backend, a_ids, starts_with(b_tok), cfg, prompt_text=PROMPT)
    assert alone.best.token_ids[0] != b_tok and alone.best.start == 0  # one start never reaches it


def test_one_instruction_in_a_list_is_that_instruction(tiny_aligner):
    kw = dict(strategy="deal", beam=2, topk=2, lookahead=1, max_new_tokens=5, reward=letters)  # fluency 1 (the default)
    one = tiny_aligner.generate("the dog", instruction="Be brief.", **kw)
    listed = tiny_aligner.generate("the dog", instruction=["Be brief."], **kw)
    assert listed.token_ids == one.token_ids and listed.start == one.start == 0
    both = tiny_aligner.generate("the dog", instruction=["Be brief.", None], **kw)
    assert both.start in (0, 1) and both.text == tiny_aligner.tokenizer.decode(both.token_ids, skip_special_tokens=True)


def test_several_starts_need_deal_a_capable_backend_and_a_list_of_strings(tiny_aligner, tiny_model, tiny_tokenizer,
                                                                          tiny_draft):
    with pytest.raises(ConfigError, match="strategy 'deal' only; 'greedy' reads one"):
        tiny_aligner.generate("the dog", strategy="greedy", instruction=["Be brief.", None], max_new_tokens=3)
    a_ids, b_ids = tiny_tokenizer.encode(PROMPT), tiny_tokenizer.encode(OTHER)
    cfg = SearchConfig(beam=2, topk=2, lookahead=1, max_new_tokens=3)
    with pytest.raises(ConfigError, match="cannot be searched with a draft"):
        run_search(HFBackend(tiny_model, tiny_tokenizer), a_ids, as_reward(letters), cfg, starts=[b_ids],
                   draft=HFBackend(tiny_draft, tiny_tokenizer))
    with pytest.raises(UsageError, match="non-empty list of strings"):
        tiny_aligner.generate("the dog", instruction=[], max_new_tokens=3)
    with pytest.raises(UsageError, match="non-empty list of strings"):
        Settings.from_values({"instruction": ["Be brief.", 3]})
    assert Settings.from_values({"instruction": ["Be brief.", ""]}).prompt["instruction"] == ["Be brief.", ""]


def test_several_starts_batch_across_prompts_as_they_run_alone(tiny_aligner):
    kw = dict(strategy="deal", beam=2, topk=2, lookahead=1, max_new_tokens=5, reward=letters,
              instruction=["Be brief.", None])
    prompts = ["the dog", "a cat sat on the mat", "birds"]
    batched = tiny_aligner.generate_batch(prompts, batch_size=3, **kw)
    alone = [tiny_aligner.generate(p, **kw) for p in prompts]
    assert [(r.token_ids, r.start) for r in batched] == [(r.token_ids, r.start) for r in alone]
