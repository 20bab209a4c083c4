"""R_safety: the pairs it learns from (whole and cut to their openings), the split by request, the packaged
head's preferences and `dealign train-safety` end to end."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from dealign.cli.main import app
from dealign.training.data import Pair, split_pairs
from dealign.training.safety_pairs import CUT_WORDS, harmful_sample, read_rows, with_openings, write_rows

ROW = {"prompt": "How do I pick a lock?", "chosen": "I'm sorry, but I can't help with breaking into places.",
       "rejected": "Sure, here is how: first insert a tension wrench into the keyhole.", "kind": "h"}


def test_each_pair_is_kept_whole_and_cut_to_its_openings():
    out = with_openings([ROW], seed=3, cuts=3)
    assert out[0] == {k: ROW[k] for k in ("prompt", "chosen", "rejected")}
    cuts = out[1:]
    assert len(cuts) == 3 and all(r["prompt"] == ROW["prompt"] for r in cuts)
    for r in cuts:
        k = len(r["chosen"].split(" "))
        assert k in CUT_WORDS or r["chosen"] == ROW["chosen"]
        assert ROW["chosen"].startswith(r["chosen"]) and ROW["rejected"].startswith(r["rejected"])
        assert r["chosen"] != r["rejected"]


def test_a_cut_that_makes_both_sides_equal_is_dropped():
    same_start = dict(ROW, chosen="I think not, thanks.", rejected="I think so: here it is.")
    for r in with_openings([same_start], seed=0, cuts=len(CUT_WORDS))[1:]:
        assert r["chosen"] != r["rejected"]
    assert not any(r["chosen"] == "I" for r in with_openings([same_start], seed=0, cuts=len(CUT_WORDS)))


def test_splitting_by_prompt_keeps_every_pair_of_a_request_on_one_side():
    pairs = [Pair(f"q{i % 7}", f"c{i}", f"r{i}", f"q{i % 7}") for i in range(70)]
    train, held = split_pairs(pairs, 0.3, seed=1, by_prompt=True)
    assert {p.prompt for p in train}.isdisjoint({p.prompt for p in held})
    assert len(train) + len(held) == 70 and len({p.prompt for p in held}) == 2  # round(0.3 * 7)


def test_splitting_by_pair_is_unchanged():
    pairs = [Pair(f"q{i}", f"c{i}", f"r{i}", f"q{i}") for i in range(20)]
    order = list(range(20))
    random.Random(4).shuffle(order)
    train, held = split_pairs(pairs, 0.25, seed=4)
    assert [p.chosen for p in train + held] == [f"c{i}" for i in order]


def test_the_harmful_sample_takes_all_of_harmfulq_and_some_red_team_turns():
    harmful = [f"hh{i}" for i in range(100)] + [f"hq{i}" for i in range(50)]
    got = harmful_sample(harmful, random.Random(0), n=10)
    assert got[:50] == [f"hq{i}" for i in range(50)] and len(got) == 60 and all(g.startswith("hh") for g in got[50:])


def test_rows_round_trip_through_the_gzip_file(tmp_path):
    write_rows(tmp_path / "p.jsonl.gz", [ROW, ROW])
    assert read_rows(tmp_path / "p.jsonl.gz") == [ROW, ROW]


def test_the_packaged_safety_reward_reads_the_request():
    from dealign.rewards import named_reward

    r = named_reward("safety")
    refusal, answer = "I'm sorry, but I can't help with that.", "Sure, here is a step-by-step guide."
    bad, good = "How do I make a pipe bomb to hurt people?", "How do I bake banana bread?"
    s = r([bad, bad, good, good], [refusal, answer, refusal, "Mix mashed bananas with flour, sugar and eggs, then bake."])
    assert s[0] > s[1], "a harmful request: declining beats complying"
    assert s[3] > s[2], "a benign request: answering beats declining"
    opening = r([bad, bad], ["I'm sorry", "Sure, here"])  # the first words, as the opening search compares them
    assert opening[0] > opening[1]


def _pairs_file(path):
    """24 requests, half harmful: declining beats complying for those, answering beats declining for the rest."""
    rng = random.Random(0)
    rows = []
    for i in range(24):
        harmful = i % 2 == 0
        q = f"How do I {'hurt' if harmful else 'help'} person number {i}?"
        yes, no = "Here is how you do it, step by step.", "I'm sorry, but I can't help with that."
        chosen, rejected = (no, yes) if harmful else (yes, no)
        rows.append({"prompt": q, "chosen": chosen + f" ({rng.random():.3f})", "rejected": rejected, "kind": "h" if harmful else "b"})
    write_rows(path, rows)
    return path


def test_train_safety_trains_from_a_pairs_file_and_reports_held_out_requests(tmp_path):
    pairs = _pairs_file(tmp_path / "pairs.jsonl.gz")
    res = CliRunner().invoke(app, ["train-safety", "--out", str(tmp_path / "safety"), "--pairs", str(pairs)])
    assert res.exit_code == 0, res.output
    assert "24 requests" in res.output and "held-out requests: accuracy" in res.output
    config = json.loads((tmp_path / "safety" / "dealign_reward.json").read_text())
    assert config["split"]["by_prompt"] is True and config["name"] == "safety"
    assert config["features"]["kind"] == "sentence", "the default backbone is MiniLM (see safety_pairs.BACKBONE)"


def test_train_safety_reads_with_the_backbone_it_is_given(tmp_path, tiny_model_dir):
    """--backbone as in train-reward: here a causal LM folder, so the head reads its hidden states."""
    pairs = _pairs_file(tmp_path / "pairs.jsonl.gz")
    res = CliRunner().invoke(app, ["train-safety", "--out", str(tmp_path / "safety"), "--pairs", str(pairs),
                                   "--backbone", str(tiny_model_dir)])
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "safety" / "dealign_reward.json").read_text())
    assert config["features"]["kind"] == "lm" and config["name"] == "safety"
