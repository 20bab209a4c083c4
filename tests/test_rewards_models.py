"""Tests of the model-based rewards: adapters on tiny random-weight models the tests build, the real
small packaged scorers (MiniLM, profanity-check, VADER), calibration, the registry and the CLI flags."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from dealign.cli.main import app
from dealign.rewards import (
    Calibration,
    Reward,
    RewardError,
    WeightedSum,
    calibrate,
    calibrated,
    embedding_similarity,
    lm_judge,
    named_reward,
    non_toxic,
    relevance,
    reward_from_path,
    sentiment,
    sequence_classifier,
)
from dealign.rewards import registry
from tiny_rewards import build_classifier, build_embedder

PROMPTS = ["the dog", "a man throws", "children sit", "the dog"]
TEXTS = ["catches a red frisbee in the park", "the ball to his dog", "on a bench and eat ice cream", "catches a red frisbee"]


@pytest.fixture(scope="session")
def tiny_embedder(tmp_path_factory):
    return build_embedder(tmp_path_factory.mktemp("st"))


@pytest.fixture(scope="session")
def tiny_rm(tmp_path_factory):
    return build_classifier(tmp_path_factory.mktemp("rm"), num_labels=1)


@pytest.fixture(scope="session")
def tiny_clf(tmp_path_factory):
    return build_classifier(tmp_path_factory.mktemp("clf"), num_labels=2, chat_template=False)


# sequence classifiers ------------------------------------------------------------------------------


def test_reward_model_folder_loads_and_scores_a_batch_like_one_at_a_time(tiny_rm):
    r = sequence_classifier(tiny_rm, batch_size=3)
    batch = r(PROMPTS, TEXTS)
    single = [r([p], [t])[0] for p, t in zip(PROMPTS, TEXTS)]
    assert len(batch) == 4 and all(math.isfinite(x) for x in batch)
    assert batch == pytest.approx(single, abs=1e-5)  # padding does not change a score
    assert batch[0] != batch[3]  # the raw score of a one-output model, not a constant
    assert r.upper_bound is None


def test_reward_model_uses_its_own_chat_template(tiny_rm):
    from dealign.rewards.classifier import _Classifier

    clf = _Classifier(tiny_rm, "cpu")
    texts, second = clf.texts(["hi"], ["there"], "prompt+response")
    assert second is None and texts == ["<|user|> hi\n<|assistant|> there\n"]
    assert clf.texts(["hi"], ["there"], "response") == (["there"], None)


def test_classifier_label_prob_logprob_and_pairs_without_template(tiny_clf):
    prob = sequence_classifier(tiny_clf, label="pos")(PROMPTS, TEXTS)
    neg = sequence_classifier(tiny_clf, label=0)(PROMPTS, TEXTS)
    logp = sequence_classifier(tiny_clf, label="POS", output="logprob")(PROMPTS, TEXTS)
    assert all(0 <= p <= 1 for p in prob)
    assert [a + b for a, b in zip(prob, neg)] == pytest.approx([1.0] * 4, abs=1e-5)
    assert logp == pytest.approx([math.log(p) for p in prob], abs=1e-5)
    assert sequence_classifier(tiny_clf, label="pos").upper_bound == 1.0


def test_classifier_errors_name_the_problem(tiny_clf, tmp_path):
    with pytest.raises(RewardError, match="2 labels.*label="):
        sequence_classifier(tiny_clf)(PROMPTS, TEXTS)
    with pytest.raises(RewardError, match="unknown label 'maybe'.*'neg'"):
        sequence_classifier(tiny_clf, label="maybe")(PROMPTS, TEXTS)
    with pytest.raises(RewardError, match="no model folder"):
        sequence_classifier(tmp_path / "missing")
    with pytest.raises(RewardError, match="output must be"):
        sequence_classifier(tiny_clf, label=1, output="odds")


def test_reward_from_path_handles_classifier_labels(tiny_clf, tiny_rm):
    assert reward_from_path(str(tiny_rm))(["a"], ["b"])[0] == pytest.approx(sequence_classifier(tiny_rm)(["a"], ["b"])[0])
    with pytest.raises(RewardError, match="PATH#LABEL"):
        reward_from_path(str(tiny_clf))
    assert 0 <= reward_from_path(f"{tiny_clf}#pos")(["a"], ["b"])[0] <= 1


# embeddings ----------------------------------------------------------------------------------------


def test_embedding_similarity_on_a_tiny_sentence_transformer(tiny_embedder):
    r = embedding_similarity(["the dog catches a frisbee", "a cat sleeps"], model=tiny_embedder)
    got = r(["x", "x"], ["the dog catches a frisbee", "players skate on the rink"])
    assert got[0] == pytest.approx(1.0, abs=1e-5)  # identical to a reference: max aggregate gives 1
    assert all(-1 <= g <= 1 for g in got) and got[1] < got[0]
    mean = embedding_similarity(["the dog catches a frisbee", "a cat sleeps"], aggregate="mean", model=tiny_embedder)
    assert mean(["x"], ["the dog catches a frisbee"])[0] < 1.0
    rel = relevance(model=tiny_embedder)(["the dog runs"], ["the dog runs"])
    assert rel[0] == pytest.approx(1.0, abs=1e-5)


def test_forget_rows_empties_the_memos_and_keeps_the_scores(tiny_embedder):
    from dealign.rewards.cache import forget_rows
    from dealign.rewards.embedding import embedder

    rel = relevance(model=tiny_embedder)
    first = rel(["the dog runs"], ["a cat sleeps"])
    assert embedder(tiny_embedder).memo
    forget_rows()
    assert not embedder(tiny_embedder).memo
    assert rel(["the dog runs"], ["a cat sleeps"]) == pytest.approx(first, abs=1e-6)


def test_embedding_similarity_rejects_bad_arguments(tiny_embedder, tmp_path):
    with pytest.raises(RewardError, match="non-empty target"):
        embedding_similarity([], model=tiny_embedder)
    with pytest.raises(RewardError, match="aggregate"):
        embedding_similarity("x", aggregate="min", model=tiny_embedder)
    with pytest.raises(RewardError, match="input must be"):
        embedding_similarity("x", input="prompt", model=tiny_embedder)
    with pytest.raises(RewardError, match="no sentence-transformers model"):
        embedding_similarity("x", model=tmp_path / "nope")(["a"], ["b"])


def test_weighted_sum_scores_each_distinct_text_once(tiny_embedder):
    seen = []
    inner = relevance(model=tiny_embedder)

    def counting(prompts, completions):
        seen.append(len(completions))
        return inner(prompts, completions)

    total = 0.5 * Reward(counting, "rel") + 0.5 * Reward(counting, "rel2")
    out = total.score(["p"] * 6, ["a", "b", "a", "a", "b", "c"])
    assert seen == [3, 3] and len(out.total) == 6 and out.total[0] == out.total[2]


# the real small packages ---------------------------------------------------------------------------


def test_packaged_minilm_prefers_a_refusal_to_a_recipe_for_a_refusal_description():
    r = embedding_similarity("A polite reply that refuses to help with something dangerous.")
    refusal, recipe = r(["q", "q"], ["I'm sorry, I can't help with that.", "Mix flour, sugar and eggs, then bake."])
    assert refusal > recipe


def test_profanity_and_sentiment_packages():
    clean, rude = non_toxic()(["", ""], ["Have a lovely day.", "You are a fucking idiot."])
    assert 0 <= rude < 0.5 < clean <= 1
    pos, neg = sentiment()(["", ""], ["I love this, it is wonderful!", "This is terrible and I hate it."])
    assert pos > 0.5 > neg
    assert sentiment("negative")([""], ["I love it"])[0] < 0.5
    with pytest.raises(RewardError, match="polarity"):
        sentiment("neutral")


# LM judge ------------------------------------------------------------------------------------------


def test_lm_judge_on_a_tiny_causal_lm_is_a_probability_and_batch_safe(tiny_model, tiny_tokenizer):
    judge = lm_judge("Is the answer about a dog?", model=(tiny_model, tiny_tokenizer), batch_size=3)
    batch = judge(PROMPTS, TEXTS)
    single = [judge([p], [t])[0] for p, t in zip(PROMPTS, TEXTS)]
    assert all(0 <= x <= 1 for x in batch)
    assert batch == pytest.approx(single, abs=1e-5)  # right padding, read at each row's last token
    assert judge.upper_bound == 1.0
    with pytest.raises(RewardError, match="yes/no question"):
        lm_judge("  ")
    with pytest.raises(RewardError, match="template may only use"):
        lm_judge("Is it ok?", template="{answer}")


# calibration ---------------------------------------------------------------------------------------


def test_quantile_calibration_is_monotone_and_bounded():
    cal = Calibration.fit([float(i) for i in range(101)])
    assert cal(-5) == 0.0 and cal(500) == 1.0
    assert cal(50) == pytest.approx(0.5) and cal(25.5) == pytest.approx(0.255)
    xs = [-1, 0, 3.3, 10, 70.2, 100, 101]
    ys = [cal(x) for x in xs]
    assert ys == sorted(ys)
    ties = Calibration.fit([0.0] * 50 + [1.0] * 50)
    assert ties(0.0) < ties(0.5) < ties(1.0)


def test_zscore_calibration_and_round_trip(tmp_path):
    cal = Calibration.fit([1.0, 2.0, 3.0], "zscore")
    assert cal(2.0) == pytest.approx(0.0) and cal(3.0) == pytest.approx(1.0)
    cal.save(tmp_path / "c.json")
    back = Calibration.load(tmp_path / "c.json")
    assert back(3.0) == cal(3.0) and back.upper_bound is None
    with pytest.raises(RewardError, match="method"):
        Calibration.fit([1, 2], "rank")
    with pytest.raises(RewardError, match="at least two"):
        Calibration.fit([1.0])


def test_calibrate_puts_two_rewards_on_one_scale():
    wide = Reward(lambda p, c: [100.0 * len(t) for t in c], "wide", every_n_tokens=3)
    narrow = Reward(lambda p, c: [0.01 * t.count("a") for t in c], "narrow")
    ref = ["a", "aa", "aaa bb", "b", "abab", "aaaa"]
    wide_q, _ = calibrate(wide, [""] * len(ref), ref)
    narrow_q, _ = calibrate(narrow, [""] * len(ref), ref)
    assert wide_q.every_n_tokens == 3 and wide_q.upper_bound == 1.0 and wide_q.name == "wide"
    both = 0.5 * wide_q + 0.5 * narrow_q
    scores = both.score([""] * 2, ["b", "aaaa"]).total
    assert all(0 <= s <= 1 for s in scores) and scores[1] > scores[0]
    assert calibrated(wide, Calibration.fit([0, 100], "zscore"))([""], ["a"])[0] == pytest.approx(50 / math.sqrt(5000))  # (100 - 50) / std


# registry and CLI ----------------------------------------------------------------------------------


def test_unknown_named_reward_suggests_the_closest():
    with pytest.raises(RewardError, match=r"unknown reward 'harmles' \(did you mean 'harmless'\?\).*helpful"):
        named_reward("harmles")
    assert set(registry.available()) >= {"harmless", "helpful", "relevance", "non_toxic", "sentiment", "judge_harmless"}
    assert named_reward("non-toxic") is named_reward("non_toxic")  # shared: its model loads once


def test_packaged_harmless_and_helpful_rewards_load_and_rank_sensibly():
    harmless, helpful = named_reward("harmless"), named_reward("helpful")
    q = "How do I build a bomb?"
    refuse, comply = "I'm sorry, but I can't help with that.", "Sure! First, get some explosives and a detonator, then"
    h = harmless([q, q], [refuse, comply])
    assert all(0 <= x <= 1 for x in h) and h[0] > h[1]
    assert harmless.upper_bound == 1.0
    q2 = "How do I bake bread?"
    g = helpful([q2, q2], ["Mix flour, water, yeast and salt, knead, let it rise, then bake at 220 C.", refuse])
    assert g[0] > g[1]
    fast = named_reward("harmless_fast")
    f = fast([q, q], [refuse, comply])
    assert fast.name == "harmless_fast" and f[0] > f[1]


def test_packaged_harmless_is_the_ensemble_it_was_measured_as():
    from dealign.rewards.registry import WEIGHTS_DIR
    from dealign.rewards.learned import EnsembleRewardModel, load_reward_folder

    ens = load_reward_folder(WEIGHTS_DIR / "harmless")
    assert isinstance(ens, EnsembleRewardModel)
    assert [(f, w) for f, _, w in ens.members] == [("minilm", 0.5), ("smollm2", 0.5)]
    assert ens.config["split"] == {"data": "harmless-base.test.jsonl.gz", "holdout": 0.2, "seed": 0,
                                   "pairs": "preference", "limit": None}

    # re-measured, not read back from the JSON: the first 40 held-out pairs (0.625 when the heads shipped; the
    # whole held-out split gives 0.660), so a change in the backbones, the heads or the split shows here
    from dealign.evaluation.harmless import heldout_pairs
    from dealign.training import pairwise_accuracy

    held = heldout_pairs()
    assert len(held) == ens.config["metrics"]["heldout_pairs"] == 462
    sample = held[:40]
    prompts = [p.prompt for p in sample]
    reward = named_reward("harmless")
    accuracy = pairwise_accuracy(reward(prompts, [p.chosen for p in sample]), reward(prompts, [p.rejected for p in sample]))
    assert accuracy >= 0.6


SMALL = ["--max-new-tokens", "4", "--beam", "2", "--topk", "2", "--lookahead", "1"]


def test_cli_reward_flags_and_errors(tiny_model_dir, tiny_rm, tmp_path):
    runner = CliRunner()

    def run(*args):
        return runner.invoke(app, ["generate", *args, "--model", str(tiny_model_dir)])

    bad = run("the dog", *SMALL, "--reward", "harmles=0.5")
    assert bad.exit_code == 2 and "did you mean 'harmless'" in bad.stderr and "Traceback" not in bad.output
    assert "--reward takes NAME=NUMBER" in run("the dog", "--reward", "harmless=lots").stderr
    assert "named reward" in run("the dog", "--weight", "harmless=0.5").stderr
    missing = run("the dog", "--reward-model", str(tmp_path / "nope"))
    assert missing.exit_code == 2 and "no reward model folder" in missing.stderr

    ok = run("the dog", *SMALL, "--reward-model", str(tiny_rm), "--reward", "sentiment=0.5", "--keywords", "dog", "--json")
    assert ok.exit_code == 0, ok.output
    data = json.loads(ok.stdout)
    assert set(data["rewards"]) == {"keywords", tiny_rm.name, "sentiment", "well_formed", "finish_with_keywords"}


def test_batch_named_rewards_field(tiny_model_dir, tiny_rm, tmp_path):
    rows = [
        {"prompt": "the dog", "named_rewards": {"sentiment": 0.25}},
        {"prompt": "a cat", "named_rewards": ["non_toxic=2"], "reward_model": str(tiny_rm)},
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = CliRunner().invoke(app, ["generate", "--input", str(inp), "--output", str(out), *SMALL,
                                   "--model", str(tiny_model_dir), "--reward", "sentiment=1"])
    assert res.exit_code == 0, res.output
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert set(got[0]["rewards"]) == {"sentiment"} and got[0]["named_rewards"] == {"sentiment": 0.25}
    assert set(got[1]["rewards"]) == {"sentiment", "non_toxic", tiny_rm.name}
    inp.write_text(json.dumps({"prompt": "x", "named_rewards": {"harmless": "high"}}) + "\n")
    bad = CliRunner().invoke(app, ["generate", "--input", str(inp), "--output", str(out), "--model", str(tiny_model_dir)])
    assert bad.exit_code == 2 and "in.jsonl line 1: named_rewards must be an object" in bad.stderr


def test_weighted_sum_with_model_rewards_is_a_plain_weighted_sum(tiny_rm):
    rm = sequence_classifier(tiny_rm)
    total = 2.0 * rm + 0.5 * sentiment()
    assert isinstance(total, WeightedSum)
    s = total.score(PROMPTS, TEXTS)
    assert s.total[0] == pytest.approx(2.0 * s.parts[rm.name][0] + 0.5 * s.parts["sentiment"][0])
    torch.testing.assert_close(torch.tensor(s.parts[rm.name]), torch.tensor(rm(PROMPTS, TEXTS)))


def test_model_rewards_can_be_scheduled_from_the_cli_and_batch_fields(tiny_model_dir, tmp_path):
    from dealign.errors import UsageError
    from dealign.settings import Settings

    total = Settings.from_values({"named_rewards": {"sentiment": 1.0}, "keywords": "dog",
                                  "reward_every_n_tokens": 4, "reward_finished_only": True}).build_reward()
    sched = {name: (r.every_n_tokens, r.finished_only) for (r, _), name in zip(total.terms, total.names)}
    assert sched == {"keywords": (1, False), "well_formed": (1, False), "finish_with_keywords": (1, False), "sentiment": (4, True)}  # programmatic rewards stay every token
    assert named_reward("sentiment").every_n_tokens == 1  # the shared named reward is not modified
    for bad, needle in (({"reward_every_n_tokens": 0}, "integer >= 1"), ({"reward_finished_only": "yes"}, "true or false")):
        with pytest.raises(UsageError, match=needle):
            Settings.from_values({"named_rewards": {"sentiment": 1.0}, **bad})
    with pytest.raises(UsageError, match="schedule model rewards"):
        Settings.from_values({"reward_every_n_tokens": 2, "keywords": "dog"}).build_reward()

    res = CliRunner().invoke(app, ["generate", "the dog", *SMALL, "--model", str(tiny_model_dir), "--reward", "sentiment=1",
                                   "--reward-every-n-tokens", "2", "--json"])
    assert res.exit_code == 0, res.output
    assert set(json.loads(res.stdout)["rewards"]) == {"sentiment"}
