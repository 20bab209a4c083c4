"""The public API: ``Aligner`` prompts, settings, rewards, results and loading."""

from __future__ import annotations

import json

import pytest
import torch

from dealign import Aligner, GenerationResult, SearchConfig
from dealign.rewards import Reward, RewardError
from dealign.search import STRATEGIES, ConfigError

FAST = {"max_new_tokens": 6, "beam": 2, "topk": 3, "lookahead": 2}
NO_FLUENCY = {**FAST, "fluency": 0.0}  # the local default fluency term does not run with a draft model


def letters(prompts, completions):
    return [sum(c.isalpha() for c in t) / len(t) if t else 0.0 for t in completions]


@pytest.fixture(scope="module")
def plain_tokenizer():
    """The tiny tokenizer without a chat template."""
    from conftest import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = None
    return tok


# prompts ----------------------------------------------------------------------------------------------


def test_generate_accepts_a_string(tiny_aligner, tiny_tokenizer):
    res = tiny_aligner.generate("the dog catches a", search=FAST)
    assert isinstance(res, GenerationResult)
    assert res.strategy == "deal"
    assert 1 <= res.num_tokens <= 6
    assert res.num_tokens == len(res.token_ids)
    assert res.text == tiny_tokenizer.decode(res.token_ids, skip_special_tokens=True)
    ids, _ = tiny_aligner.encode_prompt("the dog catches a")
    assert res.prompt_tokens == len(ids)


def test_generate_accepts_chat_messages(tiny_aligner, tiny_tokenizer):
    messages = [
        {"role": "system", "content": "answer briefly"},
        {"role": "user", "content": "the dog catches a"},
    ]
    res = tiny_aligner.generate(messages, search=FAST)
    assert res.num_tokens >= 1
    ids, user = tiny_aligner.encode_prompt(messages)
    assert user == "the dog catches a"
    assert tiny_tokenizer.decode(ids) == "<|system|> answer briefly\n<|user|> the dog catches a\n<|assistant|> "
    # the same conversation given as a string with the system text as an instruction encodes the same
    ids2, _ = tiny_aligner.encode_prompt("the dog catches a", instruction="answer briefly")
    assert ids2 == ids


def test_the_rewards_see_the_users_text(tiny_aligner):
    seen = []

    def spy(prompts, completions):
        seen.extend(prompts)
        return [0.0] * len(completions)

    tiny_aligner.generate(
        [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "a cat"}],
        reward=spy,
        search=FAST,
    )
    assert seen and set(seen) == {"a cat"}


def test_instruction_becomes_the_system_message(tiny_aligner, tiny_tokenizer):
    ids, user = tiny_aligner.encode_prompt("a cat sleeps", instruction="Be kind.")
    assert user == "a cat sleeps"
    assert tiny_tokenizer.decode(ids) == "<|system|> Be kind.\n<|user|> a cat sleeps\n<|assistant|> "
    # an existing system message keeps its text after the instruction
    ids, _ = tiny_aligner.encode_prompt(
        [{"role": "system", "content": "You help."}, {"role": "user", "content": "a cat"}], instruction="Be kind."
    )
    assert tiny_tokenizer.decode(ids) == "<|system|> Be kind.\nYou help.\n<|user|> a cat\n<|assistant|> "


def test_instruction_without_a_chat_template(tiny_model, plain_tokenizer):
    aligner = Aligner.from_model(tiny_model, plain_tokenizer)
    ids, _ = aligner.encode_prompt("a cat sleeps", instruction="Be kind.")
    assert plain_tokenizer.decode(ids) == "Be kind.\n\na cat sleeps"
    ids, _ = aligner.encode_prompt("a cat sleeps", response_prefix="Sure,")
    assert plain_tokenizer.decode(ids) == "a cat sleeps\nSure,"
    assert aligner.generate("a cat sleeps", search=FAST).num_tokens >= 1


def test_response_prefix_is_appended(tiny_aligner, tiny_tokenizer):
    ids, _ = tiny_aligner.encode_prompt("a cat sleeps", response_prefix="Sure, the")
    text = tiny_tokenizer.decode(ids)
    assert text == "<|user|> a cat sleeps\n<|assistant|> Sure, the"
    base, _ = tiny_aligner.encode_prompt("a cat sleeps")
    assert len(ids) > len(base)
    res = tiny_aligner.generate("a cat sleeps", response_prefix="Sure, the", search=FAST)
    assert res.prompt_tokens == len(ids)
    assert not res.text.startswith("Sure, the")  # the prefix is part of the prompt, not the answer


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt_is_rejected(tiny_aligner, prompt):
    with pytest.raises(ValueError, match="prompt is empty"):
        tiny_aligner.generate(prompt, search=FAST)


def test_empty_prompt_with_a_response_prefix_is_fine(tiny_aligner):
    assert tiny_aligner.generate("", response_prefix="The dog", search=FAST).num_tokens >= 1


@pytest.mark.parametrize("messages", [[], [{"role": "user"}], [{"content": "hi"}]])
def test_malformed_messages_are_rejected(tiny_aligner, messages):
    with pytest.raises(ValueError, match="role.*content"):
        tiny_aligner.generate(messages, search=FAST)


# settings ---------------------------------------------------------------------------------------------


def test_unknown_search_setting_in_a_dict_is_named(tiny_aligner):
    with pytest.raises(TypeError, match="beams"):
        tiny_aligner.generate("a cat", search={"beams": 2, "topk": 3})


def test_unknown_keyword_setting_is_named(tiny_aligner):
    with pytest.raises(TypeError, match="'lookahed' \\(did you mean 'lookahead'\\?\\)"):
        tiny_aligner.generate("a cat", lookahed=2)


def test_a_reward_field_given_as_a_search_setting_says_where_rewards_go(tiny_aligner):
    with pytest.raises(TypeError, match="'named_rewards'.*rewards go in reward="):
        tiny_aligner.generate("a cat", named_rewards={"harmless": 1.0})


def test_search_of_a_wrong_type_is_rejected(tiny_aligner):
    with pytest.raises(TypeError, match="SearchConfig"):
        tiny_aligner.generate("a cat", search=[("beam", 2)])


@pytest.mark.parametrize(
    "settings, name",
    [
        ({"beam": 0}, "beam"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"strategy": "foo"}, "strategy"),
        ({"mode": "chunk"}, "mode"),
        ({"topk": 0}, "topk"),
        ({"lookahead": -1}, "lookahead"),
        ({"lam": -1.0}, "lam"),
        ({"temperature": 0}, "temperature"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"n": 2.5}, "n"),
    ],
)
def test_out_of_range_settings_raise_config_error(tiny_aligner, settings, name):
    with pytest.raises(ConfigError, match=name):
        SearchConfig(**settings)
    with pytest.raises(ConfigError, match=name):
        tiny_aligner.generate("a cat", search=settings)
    with pytest.raises(ConfigError, match=name):
        tiny_aligner.generate("a cat", search=SearchConfig(max_new_tokens=4), **settings)
    assert issubclass(ConfigError, ValueError)


def test_keyword_overrides_apply_on_top_of_the_config(tiny_aligner):
    res = tiny_aligner.generate("a cat", search=SearchConfig(strategy="deal", max_new_tokens=9), strategy="greedy",
                                max_new_tokens=3)
    assert res.strategy == "greedy"
    assert res.num_tokens <= 3


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_runs_through_the_api(tiny_aligner, strategy):
    res = tiny_aligner.generate("the dog catches a", reward=letters, search={**FAST, "strategy": strategy, "n": 3})
    assert res.strategy == strategy
    assert 1 <= res.num_tokens <= 6
    assert res.rewards.keys() == {"letters"}
    assert res.reward == pytest.approx(letters(["x"], [res.text])[0])
    assert res.stats["forward_passes"] >= 1


def test_generate_is_deterministic(tiny_aligner):
    kw = dict(reward=letters, search={**FAST, "rollout_temperature": 0.8, "seed": 3})
    a, b = tiny_aligner.generate("a cat", **kw), tiny_aligner.generate("a cat", **kw)
    assert a.token_ids == b.token_ids
    assert a.score == b.score


# rewards ----------------------------------------------------------------------------------------------


def test_reward_of_the_wrong_length_is_named(tiny_aligner):
    def short(prompts, completions):
        return [1.0]

    with pytest.raises(RewardError, match=r"'short'.*1 scores? for \d+ completions"):
        tiny_aligner.generate("a cat", reward=short, search=FAST)


def test_reward_that_raises_is_wrapped(tiny_aligner):
    def broken(prompts, completions):
        raise KeyError("boom")

    with pytest.raises(RewardError, match="'broken' raised KeyError") as info:
        tiny_aligner.generate("a cat", reward=broken, search=FAST)
    assert isinstance(info.value.__cause__, KeyError)


def test_reward_returning_nan_is_rejected(tiny_aligner):
    with pytest.raises(RewardError, match="non-finite"):
        tiny_aligner.generate("a cat", reward=Reward(lambda p, c: [float("nan")] * len(c), "nanny"), search=FAST)


def test_weighted_rewards_are_reported_per_reward(tiny_aligner):
    length = Reward(lambda p, c: [len(t) for t in c], "length")
    res = tiny_aligner.generate("a cat", reward=0.5 * Reward(letters) + 0.1 * length, search=FAST)
    assert set(res.rewards) == {"letters", "length"}
    assert res.reward == pytest.approx(0.5 * res.rewards["letters"] + 0.1 * res.rewards["length"])
    assert res.rewards["length"] == len(res.text)


# results ----------------------------------------------------------------------------------------------


def test_result_to_dict_is_json_serialisable(tiny_aligner):
    res = tiny_aligner.generate("the dog catches a", reward=letters, search=FAST)
    data = json.loads(json.dumps(res.to_dict()))
    for key in ("text", "token_ids", "finished", "reward", "rewards", "stats", "score", "logprob", "strategy", "beam"):
        assert key in data
    assert data["text"] == res.text
    assert data["token_ids"] == res.token_ids
    assert isinstance(data["finished"], bool)
    assert data["rewards"] == {"letters": pytest.approx(res.reward)}
    for key in ("steps", "forward_passes", "tokens_processed", "seconds"):
        assert key in data["stats"]
    assert data["stats"]["steps"] >= 1
    assert data["stats"]["forward_passes"] >= 1
    assert data["stats"]["tokens_processed"] >= res.prompt_tokens
    assert data["stats"]["seconds"] > 0
    assert 1 <= len(data["beam"]) <= FAST["beam"]
    assert all({"text", "score", "logprob", "reward", "finished"} <= set(h) for h in data["beam"])


def test_search_settings_order_defaults_then_search_then_overrides(tiny_aligner, monkeypatch):
    import dealign.api as api

    seen: list[SearchConfig] = []
    real = api.run_search
    monkeypatch.setattr(api, "run_search", lambda backend, ids, reward, cfg, **kw: seen.append(cfg) or real(
        backend, ids, reward, cfg, **kw))
    defaults = tiny_aligner.search_defaults
    assert defaults["lam"] != 5.0 and defaults["fluency"] != SearchConfig.fluency  # the local defaults are in play
    # a dict names some fields: the aligner's defaults fill in the rest, as they do for keyword overrides
    by_dict = tiny_aligner.generate("a cat", search={**FAST, "lam": 5.0})
    assert (seen[-1].lam, seen[-1].fluency) == (5.0, defaults["fluency"])
    by_keywords = tiny_aligner.generate("a cat", **FAST, lam=5.0)
    assert seen[-1] == seen[-2] and by_keywords.token_ids == by_dict.token_ids
    tiny_aligner.generate("a cat", search={**FAST, "lam": 5.0}, lam=7.0)  # keywords win over the dict
    assert (seen[-1].lam, seen[-1].fluency) == (7.0, defaults["fluency"])
    # a SearchConfig states every field, so it replaces the defaults; keywords still apply on top
    tiny_aligner.generate("a cat", search=SearchConfig(**FAST))
    assert seen[-1] == SearchConfig(**FAST)
    tiny_aligner.generate("a cat", search=SearchConfig(**FAST), fluency=0.5)
    assert seen[-1] == SearchConfig(**FAST, fluency=0.5)


def test_the_constructor_takes_any_backend_and_its_defaults(tiny_aligner, tiny_tokenizer):
    plain = Aligner(tiny_aligner.backend, tiny_tokenizer)  # no search_defaults: SearchConfig's own
    assert plain.search_defaults == {} and plain.draft is None and plain.name == "tiny"
    a = plain.generate("the dog catches a", reward=letters, **FAST)
    b = tiny_aligner.generate("the dog catches a", reward=letters, search=SearchConfig(**FAST))
    assert a.token_ids == b.token_ids
    tuned = Aligner(tiny_aligner.backend, tiny_tokenizer, search_defaults={"lam": 3.0})
    c = tuned.generate("the dog catches a", reward=letters, **FAST)
    assert c.token_ids == tiny_aligner.generate("the dog catches a", reward=letters,
                                                search=SearchConfig(**FAST, lam=3.0)).token_ids


# loading ----------------------------------------------------------------------------------------------


def test_from_pretrained_loads_a_folder(tiny_model_dir, tiny_aligner):
    aligner = Aligner.from_pretrained(str(tiny_model_dir))
    assert aligner.draft is None
    a = aligner.generate("the dog catches a", strategy="greedy", max_new_tokens=8)
    b = tiny_aligner.generate("the dog catches a", strategy="greedy", max_new_tokens=8)
    assert a.token_ids == b.token_ids  # the saved weights are the fixture's


def test_from_pretrained_with_a_draft_model(tiny_model_dir):
    aligner = Aligner.from_pretrained(str(tiny_model_dir), draft_model=str(tiny_model_dir))
    assert aligner.draft is not None
    res = aligner.generate("the dog catches a", reward=letters, search=NO_FLUENCY)
    assert res.stats["draft_forward_passes"] > 0


def test_draft_model_is_used(tiny_model, tiny_draft, tiny_tokenizer):
    aligner = Aligner.from_model(tiny_model, tiny_tokenizer, draft=(tiny_draft, tiny_tokenizer))
    res = aligner.generate("the dog catches a", reward=letters, search=NO_FLUENCY)
    assert res.stats["draft_forward_passes"] > 0
    alone = Aligner.from_model(tiny_model, tiny_tokenizer).generate("the dog catches a", reward=letters, search=NO_FLUENCY)
    assert alone.stats["draft_forward_passes"] == 0


def test_draft_with_a_different_tokenizer_is_rejected(tiny_model, tiny_tokenizer):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from conftest import build_model

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["completely different words here", "zebras quietly juggle"] * 3, vocab_size=280,
                            min_frequency=1, special_tokens=["<|endoftext|>"])
    other = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    other_model = build_model(other, seed=3, layers=1, hidden=32)
    with pytest.raises(ValueError, match="share the policy's tokenizer"):
        Aligner.from_model(tiny_model, tiny_tokenizer, draft=(other_model, other))


def test_model_without_eos_is_rejected(tiny_model, plain_tokenizer):
    import copy

    model = copy.copy(tiny_model)
    model.generation_config = copy.deepcopy(tiny_model.generation_config)
    model.generation_config.eos_token_id = None
    tok = copy.deepcopy(plain_tokenizer)
    tok.eos_token = None
    with pytest.raises(ValueError, match="end-of-sequence"):
        Aligner.from_model(model, tok)
