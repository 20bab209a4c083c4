"""Tests of the ``dealign`` command line on the tiny random-weight model folder.

Settings are kept tiny (6 new tokens, beam 2, top-k 2, lookahead 2): these tests check plumbing
(flags reach the search, batch rows reach the output, errors read well), not answer quality.
"""

from __future__ import annotations

import io
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import dealign.demo
from dealign import SearchConfig
from dealign.api import Aligner
from dealign.cli.main import app
from dealign.rewards import keywords

SMALL = ["--max-new-tokens", "6", "--beam", "2", "--topk", "2", "--lookahead", "2"]
ANSWER_FIELDS = {"text", "reward", "rewards", "tokens", "seconds", "finished", "strategy", "stats"}


@pytest.fixture
def cli(tiny_model_dir):
    """Run ``dealign ARGS --model <tiny>`` in-process; stdout and stderr stay separate."""
    runner = CliRunner()

    def invoke(*args: str, model: bool = True):
        extra = ["--model", str(tiny_model_dir)] if model else []
        return runner.invoke(app, [*args, *extra])

    return invoke


def assert_clean_error(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, result.output
    assert any(line.startswith("error: ") for line in result.stderr.splitlines()), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.stderr


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# single prompt ------------------------------------------------------------------------------------


def test_generate_prints_the_same_text_as_the_api(cli, tiny_aligner):
    result = cli("generate", "the dog", *SMALL, "--keywords", "dog,frisbee")
    assert result.exit_code == 0, result.output
    expected = tiny_aligner.generate(
        "the dog", reward=keywords("dog,frisbee"), max_new_tokens=6, beam=2, topk=2, lookahead=2
    )
    assert result.stdout == expected.text + "\n"
    assert "loading model" in result.stderr  # progress notes stay off stdout


def test_unset_search_flags_fall_back_to_searchconfig_defaults(cli, monkeypatch):
    seen = {}
    original = Aligner.generate

    def spy(self, prompt, **kw):
        seen.update(kw)
        return original(self, prompt, **kw)

    monkeypatch.setattr(Aligner, "generate", spy)
    result = cli("generate", "the dog", "--max-new-tokens", "4", "--lam", "2", "--strategy", "greedy")
    assert result.exit_code == 0, result.output
    # only the given settings reach the aligner, which fills in its own defaults (SearchConfig's locally)
    assert "search" not in seen and {k: seen[k] for k in ("max_new_tokens", "lam", "strategy")} == {
        "max_new_tokens": 4, "lam": 2.0, "strategy": "greedy"}
    assert not set(seen) & ({f.name for f in dataclasses.fields(SearchConfig)} - {"max_new_tokens", "lam", "strategy"})
    assert "instruction" not in seen and "response_prefix" not in seen


def test_every_setting_is_a_generate_flag():
    """A setting reaches ``dealign generate`` by a flag of its name (or one parsed into it): adding a
    search field is the field plus its option, never a third list to keep in step."""
    import inspect

    from dealign.cli.main import _PARSED_FLAGS, _setting_values, generate
    from dealign.settings import SETTING_FIELDS

    flags = set(inspect.signature(generate).parameters)
    assert set(SETTING_FIELDS) - flags == set(_PARSED_FLAGS)
    values = _setting_values({**{name: None for name in flags}, "lam": 2.0, "must_match": [], "weight": ["keywords=0.5"]})
    assert set(values) == set(SETTING_FIELDS)
    assert (values["lam"], values["must_match"], values["weights"]) == (2.0, None, {"keywords": 0.5})


def test_json_output_has_the_result_fields_and_coverage(cli):
    result = cli("generate", "the dog", *SMALL, "--keywords", "dog,frisbee", "--max-words", "20",
                 "--weight", "keywords=0.7", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"text", "token_ids", "finished", "reward", "rewards", "logprob", "score", "strategy", "stats", "beam"} <= set(data)
    assert set(data["rewards"]) == {"keywords", "max_words", "well_formed", "finish_with_keywords"}  # keywords bring the well_formed reward
    assert 0.0 <= data["coverage"] <= 1.0
    assert data["strategy"] == "deal" and 1 <= len(data["token_ids"]) <= 6
    assert len(data["beam"]) <= 2


def test_repeated_instructions_are_start_states_searched_together(cli, tiny_aligner):
    instructions = ["answer in one short sentence", ""]
    args = [f"--instruction={i}" for i in instructions]
    result = cli("generate", "the dog", *SMALL, "--keywords", "dog", *args, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    expected = tiny_aligner.generate("the dog", reward=keywords("dog"), instruction=instructions, max_new_tokens=6,
                                     beam=2, topk=2, lookahead=2)
    assert (data["token_ids"], data["start"]) == (expected.token_ids, expected.start)
    one = cli("generate", "the dog", *SMALL, "--instruction", instructions[0], "--json")  # one is the plain instruction
    assert one.exit_code == 0, one.output
    assert json.loads(one.stdout)["token_ids"] == tiny_aligner.generate(
        "the dog", instruction=instructions[0], max_new_tokens=6, beam=2, topk=2, lookahead=2).token_ids
    assert_clean_error(cli("generate", "the dog", *args, "--strategy", "greedy"), 2, "strategy 'deal' only")


def test_explain_shows_rewards_beam_and_statistics(cli):
    result = cli("generate", "the dog", *SMALL, "--keywords", "dog", "--explain")
    assert result.exit_code == 0, result.output
    for needle in ("reward breakdown", "final beam", "search statistics", "forward passes",
                   "tokens processed", "candidates scored", "seconds", "logprob", "missing keywords"):
        assert needle in result.stdout


def test_explain_with_json_keeps_stdout_parseable(cli):
    result = cli("generate", "the dog", *SMALL, "--json", "--explain")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["stats"]["steps"] >= 1
    assert "search statistics" in result.stderr


def test_trace_writes_the_search_to_a_file_and_changes_nothing(cli, tmp_path):
    plain = cli("generate", "the dog", *SMALL, "--keywords", "dog", "--json")
    traced = cli("generate", "the dog", *SMALL, "--keywords", "dog", "--json", "--trace", str(tmp_path / "t.json"))
    assert plain.exit_code == traced.exit_code == 0, traced.output
    a, b = json.loads(plain.stdout), json.loads(traced.stdout)
    assert a["text"] == b["text"] and a["score"] == b["score"] and "trace" not in b
    doc = json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))
    assert doc["format"] == "dealign-trace" and doc["version"] == 1 and doc["answer"]["text"] == a["text"]
    assert len(doc["steps"]) == a["stats"]["steps"] and "steps written to" in traced.stderr
    assert_clean_error(cli("generate", "--input", "x.jsonl", "--output", "y.jsonl", "--trace", "t.json"), 2,
                       "--trace are for a single PROMPT")


def test_a_batch_line_can_ask_for_its_trace(cli, tmp_path):
    rows = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "the dog", "trace": True}, {"prompt": "the cat"}])
    result = cli("generate", "--input", str(rows), "--output", str(tmp_path / "out.jsonl"), *SMALL)
    assert result.exit_code == 0, result.output
    first, second = read_jsonl(tmp_path / "out.jsonl")
    assert first["trace"]["answer"]["text"] == first["text"] and "trace" not in second


@pytest.mark.parametrize("flag, opened", [([], True), (["--no-browser"], False)])
def test_explore_serves_the_page_and_opens_the_browser(cli, monkeypatch, flag, opened):
    import webbrowser

    from dealign.server import app as server_app

    seen, opens = {}, []

    def fake_serve(aligner, limits, *, host, port, model_name, log_level, on_ready):
        seen.update(limits=limits, port=port, aligner=aligner)
        on_ready("http://127.0.0.1:1234/")

    monkeypatch.setattr(server_app, "serve", fake_serve)
    monkeypatch.setattr(webbrowser, "open", opens.append)
    result = cli("explore", *flag)
    assert result.exit_code == 0, result.output
    assert "the explorer is at http://127.0.0.1:1234/" in result.stdout
    assert opens == (["http://127.0.0.1:1234/"] if opened else [])
    assert seen["port"] == 0 and seen["limits"].timeout == 600 and hasattr(seen["aligner"], "generate")


# batch ---------------------------------------------------------------------------------------------


def test_batch_writes_one_line_per_row_with_per_line_overrides(cli, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": "the dog", "strategy": "greedy"},
        {"id": "b", "prompt": "a cat", "keywords": ["cat", "mat"], "lam": 2},
        "",  # blank lines are skipped
        {"id": "c", "messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 3, "keywords": None},
    ])
    out = tmp_path / "out.jsonl"
    result = cli("generate", "--input", str(src), "--output", str(out), *SMALL, "--keywords", "dog")
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    for r in rows:
        assert ANSWER_FIELDS <= set(r)
        assert r["seconds"] >= 0 and r["stats"]["steps"] >= 1
    assert [r["strategy"] for r in rows] == ["greedy", "deal", "deal"]
    assert set(rows[0]["rewards"]) == {"keywords", "well_formed", "finish_with_keywords"} and "coverage" in rows[0]  # flag keywords apply
    assert rows[1]["keywords"] == ["cat", "mat"] and 0.0 <= rows[1]["coverage"] <= 1.0
    assert rows[2]["tokens"] <= 3
    assert rows[2]["rewards"] == {} and "coverage" not in rows[2]  # null reset the flag's keywords


def test_a_batch_row_with_several_instructions_says_which_start_answered(cli, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "the dog", "instruction": ["be brief", ""]},
                                              {"prompt": "the dog", "instruction": "be brief"}])
    out = tmp_path / "out.jsonl"
    result = cli("generate", "--input", str(src), "--output", str(out), *SMALL)
    assert result.exit_code == 0, result.output
    several, one = read_jsonl(out)
    assert several["start"] in (0, 1) and "start" not in one


def test_resume_keeps_done_rows_and_overwrite_without_it(cli, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": p} for p in ("one", "two", "three")])
    out = tmp_path / "out.jsonl"
    assert cli("generate", "--input", str(src), "--output", str(out), *SMALL).exit_code == 0
    first = out.read_text(encoding="utf-8").splitlines()[0]
    marked = json.dumps({**json.loads(first), "kept": True})
    out.write_text(marked + "\n" + '{"prompt": "tw', encoding="utf-8")  # interrupted mid-write

    result = cli("generate", "--input", str(src), "--output", str(out), *SMALL, "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming: 1 of 3" in result.stderr
    rows = read_jsonl(out)
    assert [r["prompt"] for r in rows] == ["one", "two", "three"] and rows[0]["kept"] is True

    result = cli("generate", "--input", str(src), "--output", str(out), *SMALL)
    assert result.exit_code == 0
    rows = read_jsonl(out)
    assert len(rows) == 3 and "kept" not in rows[0]


def test_resume_refuses_an_output_for_other_prompts(cli, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "one"}, {"prompt": "two"}])
    out = write_jsonl(tmp_path / "out.jsonl", [{"prompt": "something else", "text": "x"}])
    assert_clean_error(cli("generate", "--input", str(src), "--output", str(out), "--resume"), 2, "cannot resume")


def test_resume_refuses_an_output_made_with_other_settings(cli, tmp_path):
    """Same prompts, another strategy (e.g. an eval rerun with a different strategy list): not mixed in."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "one", "strategy": "deal"}, {"prompt": "two"}])
    out = write_jsonl(tmp_path / "out.jsonl", [{"prompt": "one", "strategy": "greedy", "method": "greedy", "text": "x"}])
    assert cli("generate", "--input", str(src), "--output", str(tmp_path / "ok.jsonl"), *SMALL).exit_code == 0
    ok = read_jsonl(tmp_path / "ok.jsonl")[:1]
    write_jsonl(tmp_path / "partial.jsonl", ok)  # its own answer, with the answer's "strategy" field: resumable
    assert cli("generate", "--input", str(src), "--output", str(tmp_path / "partial.jsonl"), *SMALL, "--resume").exit_code == 0
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "one", "method": "deal"}, {"prompt": "two"}])
    assert_clean_error(cli("generate", "--input", str(src), "--output", str(out), "--resume"), 2, "different 'method'")


# errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows, needles",
    [
        ([{"prompt": "ok"}, "", "{not json"], ["in.jsonl line 3", "not valid JSON"]),
        ([{"prompt": "ok"}, {"text": "no prompt"}], ["line 2", '"prompt"']),
        ([{"prompt": "ok", "lam": "high"}], ["line 1", "lam must be a number"]),
        ([{"prompt": "ok", "beam": 0}], ["line 1", "beam must be an integer >= 1"]),
        ([{"prompt": "ok", "keywords": [1, 2]}], ["line 1", "keywords"]),
        ([{"prompt": "ok", "weights": {"nope": 1}}], ["line 1", "unknown reward name"]),
        ([["a list"]], ["line 1", "JSON object"]),
    ],
)
def test_bad_input_lines_name_the_line(cli, tmp_path, rows, needles):
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    result = cli("generate", "--input", str(src), "--output", str(tmp_path / "out.jsonl"))
    assert_clean_error(result, 2, *needles)
    assert "loading model" not in result.stderr  # checked before the model is loaded


@pytest.mark.parametrize(
    "args, code, needle",
    [
        (["generate", "x", "--strategy", "foo"], 2, "strategy must be one of"),
        (["generate", "x", "--beam", "0"], 2, "beam must be an integer >= 1"),
        (["generate", "x", "--weight", "keywords"], 2, "NAME=NUMBER"),
        (["generate", "x", "--must-match", "("], 2, "invalid regular expression"),
        (["generate", "--input", "in.jsonl"], 2, "--input needs --output"),
        (["generate", "x", "--input", "in.jsonl", "--output", "o.jsonl"], 2, "not both"),
        (["generate"], 2, "give a PROMPT"),
        (["generate", "--input", "missing.jsonl", "--output", "o.jsonl"], 2, "cannot read the input file"),
        (["demo", "--n", "0"], 2, "n must be between 1"),
    ],
)
def test_usage_errors_are_one_readable_line(cli, args, code, needle):
    assert_clean_error(cli(*args), code, needle)


def test_missing_model_is_a_runtime_error(cli, tmp_path):
    result = cli("generate", "x", "--model", str(tmp_path / "no-such-model"), model=False)
    assert_clean_error(result, 1, "no-such-model")


# demo and entry point ------------------------------------------------------------------------------


def test_demo_runs_on_the_tiny_model(cli, monkeypatch):
    monkeypatch.setattr(dealign.demo, "MAX_NEW_TOKENS", 6)  # the tiny model only needs to run, not to be good
    result = cli("demo", "--n", "1")
    assert result.exit_code == 0, result.output
    assert "frisbee" in result.stdout  # the first keyword set (the table may wrap it)
    assert "greedy: mean coverage" in result.stdout and "DeAL: mean coverage" in result.stdout


def test_run_demo_returns_the_numbers(tiny_aligner, monkeypatch):
    monkeypatch.setattr(dealign.demo, "MAX_NEW_TOKENS", 6)
    out = dealign.demo.run_demo(tiny_aligner, n=2, console=Console(file=io.StringIO()))
    assert len(out["rows"]) == 2
    for name in ("greedy", "deal"):
        assert 0.0 <= out[name]["coverage"] <= 1.0 and 0.0 <= out[name]["hard_coverage"] <= 1.0
        for row in out["rows"]:
            assert set(row[name]["missing"]) <= set(row["keywords"])


def test_python_dash_m_end_to_end(tiny_model_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "dealign", "generate", "the dog", "--model", str(tiny_model_dir), *SMALL, "--json"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["strategy"] == "deal"


def test_dealign_explore_serves_the_page_on_a_free_port(tiny_model_dir):
    """The real command: the model loads, a free port is picked, the address is printed, the page answers."""
    import httpx

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dealign", "explore", "--no-browser", "--model", str(tiny_model_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = proc.stdout.readline()  # blocks until the server answers (or the command fails: "")
        assert line.startswith("the explorer is at http://127.0.0.1:"), line
        url = line.split()[4]
        page = httpx.get(url, timeout=10)
        assert page.status_code == 200 and "dealign explorer" in page.text
        assert httpx.get(url + "health", timeout=10).json()["limits"]["timeout"] == 600
    finally:
        proc.terminate()
        proc.wait(timeout=30)
