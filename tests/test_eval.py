"""Quick variants of the evaluation tasks on the tiny model: rows, resumability, report and plots."""

from __future__ import annotations

import json

import pytest

from dealign.cli.evaluate import run_eval
from dealign.cli.options import UsageError
from dealign.evaluation.tasks import LENGTH, TASKS


def _run(task, tmp_path, tiny_model_dir, strategies, n=2, **kw):
    return run_eval(task, n=n, strategies=strategies, out=tmp_path, model=str(tiny_model_dir), max_new_tokens=6,
                    judge=str(tiny_model_dir), **kw)


def test_keywords_task_writes_rows_summary_plot_and_report(tmp_path, tiny_model_dir):
    table = _run("keywords", tmp_path, tiny_model_dir, ["greedy", "prompt", "deal"])
    assert [t["method"] for t in table] == ["greedy", "prompt", "deal"]
    for t in table:
        assert t["n"] == 2 and 0 <= t["soft"] <= 1 and 0 <= t["hard_finished"] <= t["hard"] <= 1
        assert t["seconds"] > 0 and t["nll"] > 0 and t["bleu4"] >= 0 and 0 <= t["rougeL"] <= 1
    assert table[0]["x_greedy"] == 1.0
    rows = [json.loads(line) for line in (tmp_path / "output.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    assert all(("instruction" in r) == (r["method"] == "prompt") for r in rows)
    assert (tmp_path / "keywords_quality_vs_seconds.png").stat().st_size > 1000
    report = (tmp_path / "report.md").read_text()
    assert "keywords_quality_vs_seconds.png" in report and "| greedy |" in report and "torch" in report
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["seed"] == 0 and config["strategies"]["deal"]["strategy"] == "deal"


def test_an_interrupted_run_continues_where_it_stopped(tmp_path, tiny_model_dir):
    _run("keywords", tmp_path, tiny_model_dir, ["greedy", "deal"])
    out = tmp_path / "output.jsonl"
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:3]) + "\n")  # as if killed after three rows
    _run("keywords", tmp_path, tiny_model_dir, ["greedy", "deal"])
    again = out.read_text().splitlines()
    assert again[:3] == lines[:3] and len(again) == 4
    assert [json.loads(x)["text"] for x in again] == [json.loads(x)["text"] for x in lines]


def test_length_task_measures_the_limit(tmp_path, tiny_model_dir):
    table = _run("length", tmp_path, tiny_model_dir, ["greedy", "deal"], n=3)
    for t in table:
        assert 0 <= t["within_limit"] <= 1 and t["overshoot"] >= 0 and 0 <= t["topic"] <= 1
    rows = LENGTH.rows(3, ["deal"], 6)
    assert [r["max_words"] for r in rows] == [5, 8, 12]
    assert all(f"at most {r['max_words']} words" in r["prompt"] for r in rows)


def test_bad_task_or_strategy_is_a_clear_error(tmp_path, tiny_model_dir):
    with pytest.raises(UsageError, match="unknown task 'nope'"):
        _run("nope", tmp_path, tiny_model_dir, ["greedy"])
    with pytest.raises(ValueError, match="unknown strategies"):
        TASKS["keywords"].rows(2, ["greedy", "fast"], 6)
