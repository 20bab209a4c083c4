"""Alignment profiles (dealign/profiles.py): a named set of settings beneath the fields given beside it,
the same from Python, the CLI, batch lines and the server.  The shipped ``safe`` profile loads the real
reward models, so the behaviour is checked with a tiny profile of programmatic rewards patched in; the
``safe`` profile's own contents are checked without running it."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dealign import profiles
from dealign.cli.main import app
from dealign.errors import ConfigError, UsageError
from dealign.profiles import Profile, get_profile
from dealign.rewards import from_options
from dealign.settings import Settings

TINY = Profile("tiny", "keywords by a narrow search", {
    "keywords": ["dog", "ball"], "strategy": "deal", "beam": 2, "topk": 3, "lookahead": 1, "lam": 4.0,
    "instruction": "Use the words.", "max_new_tokens": 6, "weights": {"keywords": 2.0},
})


@pytest.fixture(autouse=True)
def tiny_profile(monkeypatch):
    monkeypatch.setitem(profiles.PROFILES, "tiny", TINY)


def test_a_profile_sets_its_fields_and_the_fields_beside_it_win():
    s = Settings.from_values({"profile": "tiny", "lam": 9.0, "weights": {"well_formed": 0.0}})
    assert s.search == {"strategy": "deal", "beam": 2, "topk": 3, "lookahead": 1, "lam": 9.0, "max_new_tokens": 6}
    assert s.reward["weights"] == {"keywords": 2.0, "well_formed": 0.0}  # merged name by name
    assert s.prompt == {"instruction": "Use the words."} and s.profile == "tiny"
    assert s.notes == ["lam=9.0 overrides the tiny profile's lam=4.0"]
    assert Settings.from_values({"profile": "tiny", "lam": None}).search["lam"] == 4.0  # a flag left out
    assert "instruction" not in Settings().merged({"profile": "tiny", "instruction": None}).prompt  # a line's null resets
    # a batch line's profile counts as fields of that line: over the flags, under the line's own fields
    line = Settings.from_values({"lam": 1.0, "beam": 5}).merged({"profile": "tiny", "beam": 3})
    assert line.search["lam"] == 4.0 and line.search["beam"] == 3


def test_unknown_or_malformed_profiles_are_one_line_errors():
    with pytest.raises(UsageError, match=r"unknown profile 'saef' \(did you mean 'safe'\?\)"):
        get_profile("saef")
    with pytest.raises(UsageError, match="profile must be a profile name"):
        Settings.from_values({"profile": 3})


def test_the_safe_profile_states_a_start_state_a_reward_and_a_search():
    safe = get_profile("safe").values
    assert safe["instruction"] and safe["named_rewards"] == {"safety": 1.0, "harm_gated": 0.5} and safe["strategy"] == "deal"
    cfg = Settings.from_values({"profile": "safe"}).config()  # its search settings are valid
    assert cfg.open_tokens > 0 and cfg.open_topk > cfg.topk  # a wide opening, a narrow rest
    with pytest.raises(ConfigError, match="does not fit the token budget"):  # the opening must fit the budget
        Settings.from_values({"profile": "safe", "max_new_tokens": 2}).config()


def test_python_profile_equals_the_same_settings_given_by_hand(tiny_aligner):
    by_profile = tiny_aligner.generate("the dog", profile="tiny")
    reward = from_options(keywords=["dog", "ball"], weights={"keywords": 2.0})
    by_hand = tiny_aligner.generate("the dog", reward=reward, instruction="Use the words.", strategy="deal", beam=2,
                                    topk=3, lookahead=1, lam=4.0, max_new_tokens=6)
    assert by_profile.token_ids == by_hand.token_ids and by_profile.rewards == by_hand.rewards
    assert set(by_profile.rewards) == {"keywords", "well_formed", "finish_with_keywords"}
    override = tiny_aligner.generate("the dog", profile="tiny", lam=0.0)
    assert override.token_ids == tiny_aligner.generate("the dog", reward=reward, instruction="Use the words.",
                                                       strategy="deal", beam=2, topk=3, lookahead=1, lam=0.0,
                                                       max_new_tokens=6).token_ids
    from dealign import SearchConfig
    with pytest.raises(UsageError, match="not a SearchConfig"):
        tiny_aligner.generate("the dog", profile="tiny", search=SearchConfig())


def test_cli_and_batch_take_a_profile_and_report_an_override(tiny_aligner, tiny_model_dir, tmp_path):
    runner = CliRunner()
    listed = runner.invoke(app, ["profiles"])
    assert listed.exit_code == 0 and "safe:" in listed.stdout and "tiny:" in listed.stdout and "lam = 4.0" in listed.stdout
    one = runner.invoke(app, ["generate", "the dog", "--profile", "tiny", "--lam", "0", "--json", "--model", str(tiny_model_dir)])
    assert one.exit_code == 0, one.output
    assert "note: lam=0.0 overrides the tiny profile's lam=4.0" in one.stderr
    data = json.loads(one.stdout)
    assert data["strategy"] == "deal" and len(data["token_ids"]) <= 6
    assert data["token_ids"] == tiny_aligner.generate("the dog", profile="tiny", lam=0.0).token_ids
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"prompt": "the dog", "profile": "tiny"}) + "\n" + json.dumps({"prompt": "the dog"}) + "\n")
    batch = runner.invoke(app, ["generate", "--input", str(src), "--output", str(out), "--model", str(tiny_model_dir)])
    assert batch.exit_code == 0, batch.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["text"] == tiny_aligner.generate("the dog", profile="tiny").text
    assert rows[0]["strategy"] == "deal" and "keywords" in rows[0]["rewards"] and rows[1]["rewards"] == {}
    bad = runner.invoke(app, ["generate", "the dog", "--profile", "saef", "--model", str(tiny_model_dir)])
    assert bad.exit_code != 0 and "did you mean 'safe'" in bad.stderr and "Traceback" not in bad.output


def test_the_server_takes_alignment_profile(tiny_aligner):
    from fastapi.testclient import TestClient

    from dealign.server import ServerLimits
    from dealign.server.app import create_app

    limits = ServerLimits(max_tokens=8, rewards="none")
    with TestClient(create_app(tiny_aligner, limits, model_name="tiny")) as client:
        ok = client.post("/v1/completions", json={"model": "tiny", "prompt": "the dog", "max_tokens": 6,
                                                   "alignment": {"profile": "tiny"}})
        bad = client.post("/v1/completions", json={"model": "tiny", "prompt": "the dog", "alignment": {"profile": "saef"}})
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["text"] == tiny_aligner.generate("the dog", profile="tiny").text
    assert bad.status_code == 400 and "did you mean 'safe'" in bad.json()["error"]["message"]
