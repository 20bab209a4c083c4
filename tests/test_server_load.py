"""A lighter version of ``python -m dealign.tools.loadtest``: ``dealign serve`` on the tiny model in
a subprocess (so its memory is its own), a fixed mix of good, malformed and over-limit requests, 8 at
a time within a time cap.  Every request must be answered or cleanly refused and the server's RSS
must stay flat.  The full run (200 requests, and on SmolLM2) is described in the README."""

from __future__ import annotations

import pytest

from dealign.tools.loadtest import LocalServer, main, render, run_load

pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir):
    with LocalServer(str(tiny_model_dir), ["--threads", "1", "--max-tokens", "16", "--queue-size", "16"],
                     startup_timeout=180) as server:
        yield server


def test_load_every_request_answered_or_refused_and_memory_flat(tiny_server):
    report = run_load(tiny_server.url, requests=80, concurrency=8, time_cap=120, max_tokens=8, warmup=10,
                      pid=tiny_server.pid, max_rss_growth_mb=32)
    print("\n" + render(report))
    assert report["ok"], render(report) + "\n" + tiny_server.errors()[-3000:]
    assert report["outcomes"].get("answered", 0) >= 50
    assert report["outcomes"].get("rejected") == 24  # bad-field, over-limit, bad-json: 3 of every 10
    assert report["rss_mb"]["growth"] is not None
    assert report["latency_ms"]["answered"]["p99"] >= report["latency_ms"]["answered"]["p50"] > 0


def test_overload_is_refused_cleanly(tiny_model_dir, tmp_path):
    """A batch of 2 and a queue of 1 behind 8 concurrent clients: many get 429, none fails; the exit code says so."""
    out = tmp_path / "report.json"
    code = main(["--model", str(tiny_model_dir), "--server-args", "--threads 1 --max-batch 2 --queue-size 1 --max-tokens 16",
                 "--requests", "40", "--concurrency", "8", "--time-cap", "120", "--max-tokens", "8",
                 "--warmup", "2", "--json", str(out)])
    import json

    report = json.loads(out.read_text())
    assert code == 0, render(report)
    assert report["outcomes"].get("refused", 0) > 0 and "failed" not in report["outcomes"]
