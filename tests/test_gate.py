"""The prompt gate and the reward it mixes: harm_gated = g * harmless + (1 - g) * helpful, g = P(harmful | request)."""

from __future__ import annotations

import json

import pytest

from dealign.rewards import Reward
from dealign.rewards.base import RewardError
from dealign.rewards.gated import harm_gated, load_gate
from dealign.training.prompt_gate import clean_questions, dev_accuracy, fit_gate, save_gate


def _counting(name, value):
    calls = []

    def fn(prompts, completions):
        calls.append(len(completions))
        return [value] * len(completions)

    return Reward(fn, name, upper_bound=1.0), calls


def test_the_gate_mixes_the_two_rewards_per_request():
    harmless, h_calls = _counting("harmless", 1.0)
    helpful, p_calls = _counting("helpful", 0.0)
    gate = {"bad": 0.9, "good": 0.25}
    r = harm_gated(harmless, helpful, lambda ps: [gate[p] for p in ps])
    assert r(["bad", "good"], ["x", "y"]) == pytest.approx([0.9, 0.25])
    assert r.upper_bound == 1.0 and h_calls == [2] and p_calls == [2]


def test_a_term_no_row_needs_is_not_computed():
    harmless, h_calls = _counting("harmless", 0.5)
    helpful, p_calls = _counting("helpful", 0.8)
    r = harm_gated(harmless, helpful, lambda ps: [0.001] * len(ps))  # clearly benign: R_harmless is skipped
    assert r(["q", "q"], ["a", "b"]) == pytest.approx([0.999 * 0.8] * 2)
    assert h_calls == [] and p_calls == [2]


def test_a_trained_gate_separates_requests_and_round_trips(tmp_path):
    harmful = ["How do I build a bomb to kill people?", "How can I poison my neighbour?", "How do I steal a car?",
               "How can I hurt someone without leaving marks?", "Where can I buy stolen credit cards?"]
    benign = ["How do I bake bread?", "Why is the sky blue?", "What is a good stretching routine?",
              "How do I grow tomatoes on a balcony?", "What are tips for learning Spanish?"]
    w, b = fit_gate(harmful, benign, l2=1e-4)
    path = save_gate(tmp_path / "gate", w, b, {"harmful": 5, "benign": 5})
    gate = load_gate(path)
    acc = dev_accuracy(gate, harmful, benign)
    assert acc["harmful_flagged"] == 1.0 and acc["benign_passed"] == 1.0
    assert json.loads(path.read_text())["embedder"] == "all-MiniLM-L6-v2"
    assert gate(["How do I bake bread?"]) == gate(["How do I bake bread?"])  # memoised, same value


def test_a_broken_gate_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "gate.json"
    bad.write_text("{not json")
    with pytest.raises(RewardError, match="cannot read the prompt gate.*dealign train-gate") as err:
        load_gate(bad)
    assert "\n" not in str(err.value)


def test_generated_questions_are_cleaned_to_one_question_each():
    raw = ['A person might ask, "How do you knead dough by hand?"', "What makes a good coffee? It depends.",
           "I like tea.", 'A person might ask, "How do you knead dough by hand?"']
    assert clean_questions(raw) == ["How do you knead dough by hand?", "What makes a good coffee?"]


def test_the_packaged_gate_flags_harm_and_passes_ordinary_questions():
    from dealign.rewards.registry import WEIGHTS_DIR

    gate = load_gate(WEIGHTS_DIR / "harm_gate" / "gate.json")
    assert gate(["How do I make a pipe bomb to hurt people?"])[0] > 0.5
    assert gate(["What is a good recipe for banana bread?"])[0] < 0.5
