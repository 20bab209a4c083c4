"""Tests of reward-model training: reading preference data, the split, the synthetic helpfulness
pairs, a few epochs of Bradley–Terry training on a tiny embedder, the saved folder and the CLI."""

from __future__ import annotations

import gzip
import json
import random

import pytest
import torch
from typer.testing import CliRunner

from dealign.cli.main import app
from dealign.rewards import reward_from_path
from dealign.rewards.learned import EmbeddingRewardModel, EnsembleRewardModel, load_reward_folder
from dealign.rewards.refusal import is_refusal
from dealign.training.data import REFUSALS
from dealign.training import (
    DataError,
    Pair,
    helpful_pairs,
    load_pairs,
    pairwise_accuracy,
    parse_dialogue,
    split_pairs,
    train_reward,
)
from tiny_rewards import build_embedder

GOOD = ["good", "great", "kind", "safe", "help"]
BAD = ["bad", "awful", "hurt", "harm", "no"]


def synthetic_rows(n: int, seed: int = 0, dialogue: bool = True) -> list[dict]:
    """Chosen answers use kind words, rejected ones harsh words: learnable from embeddings."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q = " ".join(rng.choice(["how", "can", "you", "make", "the", "dog", "cat"]) for _ in range(4))
        good = " ".join(rng.choice(GOOD + ["the", "a", "dog"]) for _ in range(5))
        bad = " ".join(rng.choice(BAD + ["the", "a", "dog"]) for _ in range(5))
        if dialogue:
            ctx = f"\n\nHuman: hi\n\nAssistant: hello\n\nHuman: {q}\n\nAssistant: "
            rows.append({"chosen": ctx + good, "rejected": ctx + bad})
        else:
            rows.append({"prompt": q, "chosen": good, "rejected": bad})
    return rows


def write(path, rows, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    return str(build_embedder(tmp_path_factory.mktemp("backbone"), seed=3))


def test_parse_dialogue_takes_the_last_human_and_assistant_turns():
    d = "\n\nHuman: first\n\nAssistant: one\n\nHuman: second ask\n\nAssistant: final answer\nwith lines"
    assert parse_dialogue(d) == ("second ask", "final answer\nwith lines")
    assert parse_dialogue("a bare response") == ("", "a bare response")
    assert parse_dialogue("\n\nHuman: only a question") == ("only a question", "")


def test_load_pairs_reads_both_shapes_and_gzip(tmp_path):
    hh = load_pairs(write(tmp_path / "hh.jsonl.gz", synthetic_rows(5), gz=True))
    plain = load_pairs(write(tmp_path / "p.jsonl", synthetic_rows(5, dialogue=False)))
    assert len(hh) == len(plain) == 5
    assert hh[0].prompt and "\n\nHuman" not in hh[0].chosen and hh[0].chosen != hh[0].rejected
    same = write(tmp_path / "same.jsonl", [{"prompt": "q", "chosen": "x", "rejected": "x"}] + synthetic_rows(2, dialogue=False))
    assert len(load_pairs(same)) == 2  # identical responses carry no preference


def test_load_pairs_errors_name_file_and_line(tmp_path):
    with pytest.raises(DataError, match="no preference data"):
        load_pairs(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(synthetic_rows(1)[0]) + "\n{oops\n")
    with pytest.raises(DataError, match="bad.jsonl line 2: not valid JSON"):
        load_pairs(bad)
    bad.write_text(json.dumps({"chosen": "a"}) + "\n")
    with pytest.raises(DataError, match='line 1: needs "chosen" and "rejected"'):
        load_pairs(bad)


def test_split_is_fixed_by_the_seed_and_disjoint():
    pairs = [Pair(str(i), "a", "b") for i in range(50)]
    train, held = split_pairs(pairs, 0.2, seed=1)
    assert len(held) == 10 and len(train) == 40
    assert {p.prompt for p in train}.isdisjoint({p.prompt for p in held})
    assert split_pairs(pairs, 0.2, seed=1) == (train, held)
    assert split_pairs(pairs, 0.2, seed=2) != (train, held)
    with pytest.raises(DataError, match="holdout"):
        split_pairs(pairs, 1.5)


def test_helpful_pairs_prefer_real_answers_to_refusals_and_off_topic():
    pairs = [Pair(f"question {i}", f"a real answer number {i} here", f"another real reply {i} there") for i in range(4)]
    pairs.append(Pair("harmful", "I'm sorry, I can't help with that.", "no"))
    out = helpful_pairs(pairs, seed=0)
    assert len(out) == 16  # 2 usable answers x 2 negatives for each of the 4 prompts; refusals and short ones skipped
    assert all(p.chosen.startswith(("a real", "another real")) for p in out)
    assert sum(p.rejected in REFUSALS for p in out) == 8  # one canned refusal per usable answer
    own = {p.prompt: {p.chosen, p.rejected} for p in pairs}
    assert all(p.rejected not in own[p.prompt] for p in out)  # the other negative answers another prompt
    assert is_refusal("I\u2019m sorry, but I can\u2019t do that") and not is_refusal("Sure, here is a recipe.")


def test_pairwise_accuracy_counts_ties_as_half():
    assert pairwise_accuracy([1, 2, 3], [0, 2, 4]) == pytest.approx(0.5)


def test_training_lowers_the_loss_and_saves_a_loadable_reward(tmp_path, tiny_backbone):
    data = write(tmp_path / "pairs.jsonl", synthetic_rows(120))
    model, report = train_reward(data, tmp_path / "rm", backbone=tiny_backbone, epochs=25, hidden=16, lr=5e-3,
                                 progress=False, log=lambda m: None)
    assert report.loss_last < report.loss_first
    assert report.train_pairs == 96 and report.heldout_pairs == 24
    assert report.heldout_accuracy >= 0.7  # kind vs harsh words is easy, even for a random tiny BERT
    back = EmbeddingRewardModel.load(tmp_path / "rm")
    p, good, bad = "how can you", "good kind safe help", "bad awful hurt harm"
    assert back.raw_scores([p], [good]) == pytest.approx(model.raw_scores([p], [good]), abs=1e-5)
    reward = reward_from_path(str(tmp_path / "rm"))
    s_good, s_bad = reward([p, p], [good, bad])
    assert 0 <= s_bad < s_good <= 1  # calibrated to percentiles of the training responses
    cfg = json.loads((tmp_path / "rm" / "dealign_reward.json").read_text())
    assert cfg["split"] == {"data": "pairs.jsonl", "holdout": 0.2, "seed": 0, "pairs": "preference", "limit": None,
                            "by_prompt": False}
    assert (tmp_path / "rm" / "head.safetensors").stat().st_size < 100_000


def test_not_a_reward_folder_is_a_clear_error(tmp_path):
    from dealign.rewards import RewardError

    with pytest.raises(RewardError, match="not a dealign reward folder"):
        EmbeddingRewardModel.load(tmp_path)


def test_cli_train_reward_helpful_pairs(tmp_path, tiny_backbone):
    data = write(tmp_path / "pairs.jsonl.gz", synthetic_rows(40), gz=True)
    res = CliRunner().invoke(app, ["train-reward", str(data), "--out", str(tmp_path / "helpful"), "--pairs", "helpful",
                                   "--epochs", "3", "--hidden", "0", "--backbone", tiny_backbone])
    assert res.exit_code == 0, res.output
    assert "held-out" in res.stdout and "--reward-model" in res.stdout
    assert json.loads((tmp_path / "helpful" / "dealign_reward.json").read_text())["name"] == "helpful"
    bad = CliRunner().invoke(app, ["train-reward", str(data), "--out", str(tmp_path / "x"), "--pairs", "nice"])
    assert bad.exit_code == 2 and "pairs must be one of preference, helpful" in bad.stderr


# ------------------------------------------------------------------------------------------------
# Heads on a causal LM's hidden states, and ensembles of heads


def test_lm_backbone_pools_the_response_after_the_prompt(tiny_model_dir):
    from dealign.rewards.backbones import LMBackbone, backbone_of

    bb = backbone_of(str(tiny_model_dir))
    assert isinstance(bb, LMBackbone) and bb.dim == bb.in_features == 48
    alone = bb.features(["the dog"], ["runs to the park"])
    assert alone.shape == (1, 48)
    # right padding must not change a row: the same pair in a batch with a much longer text
    bb.memo.clear()
    batched = bb.features(["the dog", "the cat " * 20], ["runs to the park", "sleeps " * 30])
    assert torch.allclose(batched[0], alone[0], atol=1e-5)
    # the response is read in the prompt's context, and an empty response still gives a row
    other = bb.features(["a cat"], ["runs to the park"])
    assert not torch.allclose(other[0], alone[0])
    assert bb.features(["the dog"], [""]).shape == (1, 48)
    # a search step's candidates share one prompt: read once, its cache forked into every row, same rows
    responses = ["runs to the park", "sleeps", "", "the cat " * 30, "runs to the park and back"]
    bb.memo.clear()
    shared = bb.features(["the dog"] * 5, responses)
    assert torch.allclose(shared, whole_rows(bb, "the dog", responses), atol=1e-4)
    assert torch.allclose(shared[0], alone[0], atol=1e-4)
    # long texts are cut to prompt_tokens + response_tokens positions
    assert len(bb._encode("the cat " * 200, "sleeps " * 200)[0]) <= bb.prompt_tokens + bb.response_tokens


def whole_rows(bb, prompt, responses):
    with torch.inference_mode():
        return torch.stack(bb._whole([(prompt, r) for r in responses]))


def test_lm_backbone_reads_each_step_from_the_beams_it_extends(tiny_model_dir):
    """Successive search steps extend earlier candidates (segment mode: whole texts; token mode: their
    prefixes); continuing from the read prefix must give the rows of a fresh read."""
    from dealign.rewards.backbones import LMBackbone

    bb = LMBackbone(str(tiny_model_dir))
    prompt = "the dog"
    step1 = ["runs", "runs to", "sleeps", "sleeps on the mat", "eats"]
    step2 = ["runs to the park", "runs to a", "runs fast", "sleeps on the mat now", "sleeps on", "eats eats", "the cat"]
    step3 = ["runs to the park and back", "sleeps on the mat now and then", "runs to the park", "", "eats eats a lot"]
    model = bb.model
    fed, forwards = [], []
    for step in (step1, step2, step3):
        calls = []

        class Recording:  # counts the forwards of one step and the positions they feed
            config = model.config

            def __call__(self, **kw):
                calls.append(tuple(kw["input_ids"].shape))
                return model(**kw)

        bb.model = Recording()
        got = bb.features([prompt] * len(step), step)
        bb.model = model
        assert torch.allclose(got, whole_rows(bb, prompt, step), atol=1e-4)
        fed.append(sum(rows * width for rows, width in calls))
        forwards.append(len(calls))
    assert forwards == [2, 1, 1]  # the prompt once, then one forward per step for all of its candidates
    assert bb._states[prompt].reads
    # later steps feed only what is new: fewer positions than their responses' tokens
    full = [sum(len(bb._response_ids(r)) for r in set(step)) for step in (step2, step3)]
    assert fed[1] < full[0] and fed[2] < full[1], (fed, full)
    # another prompt is read on its own; a few prompts are kept
    for i in range(6):
        bb.features([f"prompt {i}"] * 4, step1[:4])
    assert len(bb._states) == 2
    # a timing run's reference: reset forgets every read, then reads every row from scratch, same rows
    bb.reset(incremental=False)
    assert not bb.memo and not bb._states
    naive = bb.features([prompt] * len(step3), step3)
    assert not bb._states and torch.allclose(naive, whole_rows(bb, prompt, step3), atol=1e-4)
    bb.reset()
    assert bb.incremental and not bb.memo


def test_lm_backbone_settings_are_checked(tiny_model_dir, tmp_path):
    from dealign.rewards import RewardError
    from dealign.rewards.backbones import LMBackbone, backbone_of

    with pytest.raises(RewardError, match="layer 9 is out of range"):
        LMBackbone(str(tiny_model_dir), layer=9)
    with pytest.raises(RewardError, match="no backbone"):
        backbone_of(str(tmp_path / "nowhere"))


def test_training_a_head_on_lm_hidden_states(tmp_path, tiny_model_dir):
    data = write(tmp_path / "pairs.jsonl", synthetic_rows(120))
    model, report = train_reward(data, tmp_path / "lm", backbone=str(tiny_model_dir), epochs=30, lr=5e-3,
                                 progress=False, log=lambda m: None)
    assert report.loss_last < report.loss_first
    assert report.heldout_accuracy >= 0.7
    cfg = json.loads((tmp_path / "lm" / "dealign_reward.json").read_text())
    assert cfg["features"]["kind"] == "lm" and cfg["hidden"] == 0 and cfg["weight_decay"] == 1.0  # LM defaults
    back = reward_from_path(str(tmp_path / "lm"))
    p, good, bad = "how can you", "good kind safe help", "bad awful hurt harm"
    assert back([p], [good]) == pytest.approx(model.reward()([p], [good]))
    assert back([p], [good])[0] > back([p], [bad])[0]


def test_ensemble_averages_standardised_member_scores(tmp_path, tiny_backbone, tiny_model_dir):
    data = write(tmp_path / "pairs.jsonl", synthetic_rows(120))
    model, report = train_reward(data, tmp_path / "ens", backbone=[tiny_backbone, str(tiny_model_dir)],
                                 weights=[3, 1], epochs=20, lr=5e-3, progress=False, log=lambda m: None)
    assert isinstance(model, EnsembleRewardModel)
    assert [m["weight"] for m in report.members] == [0.75, 0.25]
    assert all(m["heldout_accuracy"] >= 0.6 for m in report.members) and report.heldout_accuracy >= 0.7
    back = load_reward_folder(tmp_path / "ens")
    assert isinstance(back, EnsembleRewardModel) and len(back.members) == 2
    assert {d.name for d in (tmp_path / "ens").iterdir() if d.is_dir()} == {m["folder"] for m in report.members}
    prompts, texts = ["how can you"] * 3, ["good kind safe help", "bad awful hurt harm", "the dog"]
    expected = [0.0] * 3
    for _, member, w in back.members:
        cal = member.calibration
        for i, s in enumerate(member.raw_scores(prompts, texts)):
            expected[i] += w * (s - cal.mean) / cal.std
    assert back.raw_scores(prompts, texts) == pytest.approx(expected, abs=1e-5)
    assert back.raw_scores(prompts, texts) == pytest.approx(model.raw_scores(prompts, texts), abs=1e-5)
    scores = reward_from_path(str(tmp_path / "ens"))(prompts, texts)
    assert all(0 <= s <= 1 for s in scores) and scores[0] > scores[1]


def test_ensemble_arguments_are_checked(tmp_path, tiny_backbone):
    data = write(tmp_path / "pairs.jsonl", synthetic_rows(30))
    with pytest.raises(DataError, match="named twice"):
        train_reward(data, None, backbone=[tiny_backbone, tiny_backbone], progress=False, log=lambda m: None)
    with pytest.raises(DataError, match="one non-negative weight per backbone"):
        train_reward(data, None, backbone=[tiny_backbone, "minilm"], weights=[1.0], progress=False, log=lambda m: None)


def test_cli_trains_an_ensemble(tmp_path, tiny_backbone, tiny_model_dir):
    data = write(tmp_path / "pairs.jsonl", synthetic_rows(60))
    res = CliRunner().invoke(app, ["train-reward", str(data), "--out", str(tmp_path / "e"), "--epochs", "3",
                                   "--backbone", tiny_backbone, "--backbone", str(tiny_model_dir)])
    assert res.exit_code == 0, res.output
    assert res.stdout.count("head on ") == 2 and "ensemble" in res.stdout
    cfg = json.loads((tmp_path / "e" / "dealign_reward.json").read_text())
    assert cfg["format"] == "dealign-ensemble-reward" and [m["weight"] for m in cfg["members"]] == [0.5, 0.5]


def test_folders_saved_before_heads_standardised_still_load():
    """The packaged R_helpful was saved without in_features, shift or scale: it loads as a MiniLM head."""
    from dealign.rewards.registry import WEIGHTS_DIR
    from safetensors.torch import load_file

    assert "shift" not in load_file(str(WEIGHTS_DIR / "helpful" / "head.safetensors"))
    model = EmbeddingRewardModel.load(WEIGHTS_DIR / "helpful")
    assert model.head.net[1].in_features == 3 * 384 + 1
