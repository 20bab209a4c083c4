"""Constraints through the CLI (flags and batch lines) and the server (OpenAI response_format with
the real openai client, alignment.regex / alignment.grammar)."""

from __future__ import annotations

import json
import re

import openai
import pytest
from typer.testing import CliRunner

from dealign.cli.main import app
from dealign.server.app import create_app

from test_constraints import PATTERN, SCHEMA, _valid_json
from test_server import LIMITS, LoopbackServer

SMALL = ["--beam", "2", "--topk", "2", "--lookahead", "2", "--max-new-tokens", "48"]


@pytest.fixture
def cli(tiny_model_dir):
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [*args, "--model", str(tiny_model_dir)])


def test_cli_json_schema_file_regex_and_choice(cli, tmp_path):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    out = cli("generate", "the dog", "--json-schema", str(path), "--keywords", "dog", *SMALL)
    assert out.exit_code == 0, out.output
    assert _valid_json(out.stdout.strip())
    out = cli("generate", "the dog", "--json-schema", json.dumps(SCHEMA), "--strategy", "greedy", "--max-new-tokens", "48")
    assert out.exit_code == 0 and _valid_json(out.stdout.strip()), out.output
    out = cli("generate", "the dog", "--regex", PATTERN, *SMALL)
    assert out.exit_code == 0 and re.fullmatch(PATTERN, out.stdout.strip()), out.output
    out = cli("generate", "the dog", "--choice", "yes", "--choice", "no", "--strategy", "beam", "--json")
    assert out.exit_code == 0 and json.loads(out.stdout)["text"] in ("yes", "no"), out.output
    assert json.loads(out.stdout)["stats"]["constraint"]["complete"] is True
    grammar = tmp_path / "g.lark"
    grammar.write_text('start: "the " ("dog" | "cat")')
    out = cli("generate", "the dog", "--grammar", str(grammar), *SMALL)
    assert out.exit_code == 0 and out.stdout.strip() in ("the dog", "the cat"), out.output


@pytest.mark.parametrize("args, needle", [
    (["--json-schema", '{"type": "nonsense"}'], "invalid JSON schema"),
    (["--regex", "a(b"], "invalid regex"),
    (["--grammar", "start: foo ("], "invalid grammar"),
    (["--regex", "a", "--choice", "b"], "not several"),
    (["--regex", "a", "--engine-url", "http://127.0.0.1:9"], "needs a local model"),
])
def test_cli_bad_constraints_are_one_line_errors(cli, args, needle):
    out = cli("generate", "the dog", *args)
    assert out.exit_code == 2, out.output
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], out.stderr


def test_batch_lines_carry_their_own_constraint(cli, tmp_path):
    rows = [{"prompt": "the dog", "json_schema": SCHEMA}, {"prompt": "a cat", "choice": ["yes", "no"]},
            {"prompt": "a cat", "regex": PATTERN}]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = cli("generate", "--input", str(src), "--output", str(dst), "--batch-size", "2", *SMALL)
    assert out.exit_code == 0, out.output
    answers = [json.loads(line) for line in dst.read_text().splitlines()]
    assert _valid_json(answers[0]["text"]) and answers[1]["text"] in ("yes", "no")
    assert re.fullmatch(PATTERN, answers[2]["text"])
    src.write_text(json.dumps({"prompt": "a cat", "regex": "a(b"}) + "\n")  # refused before any model work
    out = cli("generate", "--input", str(src), "--output", str(tmp_path / "bad.jsonl"), *SMALL)
    assert out.exit_code == 2 and "invalid regex" in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def client(tiny_aligner):
    srv = LoopbackServer(create_app(tiny_aligner, LIMITS.__class__(**{**LIMITS.__dict__, "max_tokens": 48}),
                                    model_name="tiny"))
    yield srv.client()
    srv.stop()


def test_server_response_format_json_schema_and_json_object(client):
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "describe a pet"}], max_tokens=48,
        response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}})
    assert _valid_json(reply.choices[0].message.content) and reply.choices[0].finish_reason == "stop"
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "a pet"}], max_tokens=48,
        response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}},
        extra_body={"alignment": {"keywords": ["dog"], "beam": 2, "topk": 2, "lookahead": 2}})
    assert _valid_json(reply.choices[0].message.content)
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a pet"}], max_tokens=3,
                                           response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason == "length"  # cut by the budget, and says so


def test_server_alignment_regex_and_grammar(client):
    reply = client.completions.create(model="tiny", prompt="the dog", max_tokens=48,
                                      extra_body={"alignment": {"regex": PATTERN, "beam": 2, "topk": 2}})
    assert re.fullmatch(PATTERN, reply.choices[0].text)
    reply = client.completions.create(model="tiny", prompt="the dog", max_tokens=48,
                                      extra_body={"alignment": {"grammar": 'start: "yes" | "no"'}})
    assert reply.choices[0].text in ("yes", "no")


@pytest.mark.parametrize("kwargs, needle", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "invalid JSON schema"),
    ({"response_format": {"type": "xml"}}, "json_object or json_schema"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"alignment": {"regex": "a"}}}, "not both"),
    ({"extra_body": {"alignment": {"regex": "a(b"}}}, "invalid regex"),
])
def test_server_bad_formats_are_400s(client, kwargs, needle):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8, **kwargs)
    assert needle in str(err.value)
