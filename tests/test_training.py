"""Tests of reward-model training: reading preference data, the split, the synthetic helpfulness
pairs, a few epochs of Bradley–Terry training on a tiny embedder, the saved folder and the CLI."""

from __future__ import annotations

import gzip
import json
import random

import pytest
from typer.testing import CliRunner

from dealign.cli.main import app
from dealign.rewards import reward_from_path
from dealign.training.data import REFUSALS
from dealign.training import (
    DataError,
    EmbeddingRewardModel,
    Pair,
    helpful_pairs,
    is_refusal,
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
    assert cfg["split"] == {"data": "pairs.jsonl", "holdout": 0.2, "seed": 0, "pairs": "preference", "limit": None}
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
