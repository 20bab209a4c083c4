"""``--workers N``: batch rows on Ray actors must give the single-process output row for row.

One local Ray instance (2 CPUs) serves the whole module; the model is the tiny random-weight folder,
so these tests measure plumbing (order, seeds, resume, errors), not speed.
"""

from __future__ import annotations

import json
import re
import logging
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dealign.cli.main import app
from dealign.settings import Settings

SMALL = ["--max-new-tokens", "6", "--beam", "2", "--topk", "2", "--lookahead", "2"]
TIMING = ("seconds",)  # the only fields allowed to differ between runs


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


def run(tiny_model_dir: Path, *args: str):
    return CliRunner().invoke(app, ["generate", *args, *SMALL, "--model", str(tiny_model_dir)])


def mixed_rows(count: int) -> list[dict]:
    """Every strategy the batch path offers, sampling ones with per-row seeds."""
    words = ["dog", "frisbee", "park", "cat", "mat", "ball", "beach", "bike", "river", "team"]
    kinds = [
        lambda i: {"strategy": "greedy"},
        lambda i: {"strategy": "deal", "keywords": [words[i % 10], words[(i + 3) % 10]]},
        lambda i: {"strategy": "best-of-n", "n": 3, "seed": i, "keywords": [words[i % 10]]},
        lambda i: {"strategy": "sample", "seed": i, "temperature": 0.9},
        lambda i: {"strategy": "deal", "rollout_temperature": 0.7, "seed": i, "max_words": 4},
        lambda i: {"strategy": "beam"},
    ]
    prompts = ["the dog", "a man throws", "children sit", "the cat", "a woman rides", "players skate"]
    return [{"id": i, "prompt": f"{prompts[i % 6]} {words[i % 10]}", **kinds[i % len(kinds)](i)} for i in range(count)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def untimed(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    for r in rows:
        for k in TIMING:
            r.pop(k, None)
            r["stats"].pop(k, None)
    return rows


@pytest.fixture(scope="module")
def single(tiny_model_dir, tmp_path_factory):
    """200 mixed rows answered in-process: the reference output."""
    folder = tmp_path_factory.mktemp("single")
    src = write_jsonl(folder / "in.jsonl", mixed_rows(200))
    out = folder / "out.jsonl"
    result = run(tiny_model_dir, "--input", str(src), "--output", str(out))
    assert result.exit_code == 0, result.output
    return src, untimed(out)


def test_two_workers_match_single_process_row_for_row(ray_local, tiny_model_dir, single, tmp_path):
    src, expected = single
    out = tmp_path / "out.jsonl"
    result = run(tiny_model_dir, "--input", str(src), "--output", str(out), "--workers", "2")
    assert result.exit_code == 0, result.output
    assert "2 workers" in result.stderr and "200/200" in result.stderr  # progress notes and bar on stderr
    got = untimed(out)
    assert len(got) == len(expected) == 200
    for g, e in zip(got, expected):
        assert g == e, f"row {e['id']} differs"
    assert {r["strategy"] for r in got} == {"greedy", "deal", "best-of-n", "sample", "beam"}


def test_workers_with_batch_size_match_single_process_row_for_row(ray_local, tiny_model_dir, single, tmp_path):
    """Each actor searches 3 rows at a time in lock-step; the output is still the single-process one."""
    src, expected = single
    out = tmp_path / "out.jsonl"
    result = run(tiny_model_dir, "--input", str(src), "--output", str(out), "--workers", "2", "--batch-size", "3")
    assert result.exit_code == 0, result.output
    shared, steps = map(int, re.search(r"lock-step: (\d+) of (\d+) steps", result.stderr).groups())
    assert shared > steps / 2  # the actors' rows did share their forward passes
    got = untimed(out)
    assert len(got) == 200
    for g, e in zip(got, expected):  # the forward passes a row rode in are the batch's, not its own
        gs, es = g.pop("stats"), dict(e)
        assert gs["steps"] == es.pop("stats")["steps"]
        assert g == es, f"row {e['id']} differs"


def test_resume_with_workers_keeps_written_rows_and_finishes(ray_local, tiny_model_dir, single, tmp_path):
    src, expected = single
    lines = Path(str(src).replace("in.jsonl", "out.jsonl")).read_text(encoding="utf-8").splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    kept = json.dumps({**json.loads(lines[0]), "kept": True}) + "\n"
    out.write_text(kept + "".join(lines[1:37]) + lines[37][:25], encoding="utf-8")  # interrupted mid-write
    result = run(tiny_model_dir, "--input", str(src), "--output", str(out), "--workers", "2", "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming: 37 of 200" in result.stderr
    got = untimed(out)
    assert got[0].pop("kept") is True  # rows already written are left alone
    assert got == expected


def test_a_refused_row_keeps_every_earlier_row(ray_local, tiny_model_dir, tmp_path):
    rows = mixed_rows(30)
    rows[20]["prompt"] = ""  # the search refuses an empty prompt (after the model has loaded)
    src, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    result = run(tiny_model_dir, "--input", str(src), "--output", str(out), "--workers", "2")
    assert result.exit_code == 2, result.output
    assert "in.jsonl line 21" in result.stderr and "rerun with --resume" in result.stderr
    assert "Traceback" not in result.output
    assert [r["id"] for r in untimed(out)] == list(range(20))


def test_a_missing_model_fails_before_the_workers_start(ray_local, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    result = CliRunner().invoke(app, ["generate", "--input", str(src), "--output", str(tmp_path / "o.jsonl"),
                                      "--workers", "2", "--model", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "no model folder" in result.stderr, result.output


# without Ray --------------------------------------------------------------------------------------


def test_workers_need_batch_mode_and_a_positive_count(tiny_model_dir):
    r = CliRunner().invoke(app, ["generate", "hi", "--workers", "2"])
    assert r.exit_code == 2 and "--workers is for batch mode" in r.stderr
    r = CliRunner().invoke(app, ["generate", "--input", "x.jsonl", "--output", "y.jsonl", "--workers", "0"])
    assert r.exit_code == 2 and "--workers must be >= 1" in r.stderr


def test_missing_ray_names_the_extra_and_leaves_the_output_alone(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    result = run(tiny_model_dir, "--input", str(src), "--output", str(out), "--workers", "2")
    assert result.exit_code == 1 and "pip install 'dealign[ray]'" in result.stderr, result.output
    assert out.read_text() == "precious\n"


def test_one_worker_never_imports_ray(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # any `import ray` on this path would fail
    src = write_jsonl(tmp_path / "in.jsonl", mixed_rows(3))
    result = run(tiny_model_dir, "--input", str(src), "--output", str(tmp_path / "out.jsonl"), "--workers", "1")
    assert result.exit_code == 0, result.output
    assert len(untimed(tmp_path / "out.jsonl")) == 3


class _FakeRay:
    """Just enough of Ray for ``_drive``: calls run at once, and ``wait`` hands back the *newest*
    pending result first, so completion order is the reverse of submission order."""

    class exceptions:
        RayError = RuntimeError

    @staticmethod
    def wait(refs, num_returns=1):
        return [refs[-1]], refs[:-1]

    @staticmethod
    def get(ref):
        return ref.value


class _FakeActor:
    def __init__(self, seen):
        self.answer = self
        self.seen = seen

    def remote(self, index, lineno, row):
        self.seen.append(index)
        ref = type("Ref", (), {})()  # hashable, like an ObjectRef
        ref.value = (index, {"i": index}, None) if row.get("ok", True) else (index, None, ("usage", "refused"))
        return ref


def test_reorder_buffer_writes_a_growing_prefix_under_out_of_order_completion(tmp_path):
    from dealign.batch import Job
    from dealign.batch.ray_runner import _drive

    class Bar:
        def update(self):
            pass

    jobs = [Job(i + 1, {"ok": i != 50}, "p", Settings(), None, None) for i in range(60)]
    seen: list[int] = []
    prefixes: list[list[int]] = []

    class Out:
        lines: list[int] = []

        def write(self, text):
            self.lines.append(json.loads(text)["i"])

        def flush(self):
            prefixes.append(list(self.lines))

    out = Out()
    with pytest.raises(ValueError, match="src.jsonl line 51: refused"):
        _drive(_FakeRay, [_FakeActor(seen), _FakeActor(seen)], jobs, 5, out, Bar(), "src.jsonl", window=8)
    assert out.lines == list(range(5, 50))  # every row before the refused one, in order, none after
    assert all(p == list(range(5, 5 + len(p))) for p in prefixes)  # the file is always a prefix
    assert max(seen) < 50 + 8  # never more than `window` rows past the first unwritten one


def test_the_spec_builds_a_remote_engine_client(monkeypatch, tmp_path):
    """Workers receive *how* to build the aligner; with an engine URL that is ``Aligner.from_remote``."""
    from dealign.api import Aligner
    from dealign.batch import AlignerSpec

    seen = {}
    monkeypatch.setattr(Aligner, "from_remote", classmethod(lambda cls, url, **kw: seen.update(url=url, **kw) or "client"))
    spec = AlignerSpec("tok", engine_url="http://127.0.0.1:9", engine_dialect="vllm", engine_model="m", engine_top_n=8)
    assert spec.build() == "client"
    assert seen == {"url": "http://127.0.0.1:9", "dialect": "vllm", "tokenizer": "tok", "model": "m", "top_n": 8}
    seen.clear()
    assert AlignerSpec(engine_url="http://127.0.0.1:9").build() == "client"
    assert seen == {"url": "http://127.0.0.1:9", "tokenizer": None}  # unset options: the API's defaults
    (tmp_path / "rel").mkdir()
    monkeypatch.chdir(tmp_path)
    assert AlignerSpec("rel").localized().model == str(tmp_path / "rel")  # paths survive another cwd
    assert AlignerSpec("smollm2").localized().model == "smollm2"  # names stay names


def test_eval_with_workers_answers_like_one_process(ray_local, tiny_model_dir, tmp_path):
    outputs = []
    for workers in ("1", "2"):
        folder = tmp_path / f"w{workers}"
        result = CliRunner().invoke(app, ["eval", "keywords", "--n", "4", "--strategies", "greedy,best-of-n,deal",
                                          "--max-new-tokens", "6", "--model", str(tiny_model_dir), "--judge",
                                          str(tiny_model_dir), "--out", str(folder), "--workers", workers])
        assert result.exit_code == 0, result.output
        outputs.append(untimed(folder / "output.jsonl"))
    assert len(outputs[0]) == 12 and outputs[0] == outputs[1]
