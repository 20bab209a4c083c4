"""A bounded load test of ``dealign serve`` on loopback.

    python -m dealign.tools.loadtest --model PATH_OR_NAME [--requests 200] [--concurrency 8] [--time-cap 300]
    python -m dealign.tools.loadtest --url http://127.0.0.1:8000 [--pid SERVER_PID]

With ``--model`` it starts ``dealign serve`` in a subprocess on a free loopback port (and stops it at
the end); with ``--url`` it drives a running server (give ``--pid`` to watch its memory).  After a
warm-up, ``--requests`` requests run ``--concurrency`` at a time within ``--time-cap`` seconds: a fixed
mix of plain and DeAL-aligned completions and chat completions, streamed and not, plus malformed and
over-limit requests that must be refused with a 4xx and a message.  Every request must end answered
(200 with a well-formed body or a complete event stream), cleanly refused (429/503 with an error
message, e.g. a full queue or the time limit) or, for the bad ones, rejected with a 400 and a message;
anything else (a 500, a dropped connection, a malformed body, a missing reply) fails the run, as does
server RSS growing by more than ``--max-rss-growth-mb`` over the second half of the requests (a leak
keeps growing; the working set of a full batch — KV cache, allocator arenas — settles within the
first half; the warm-up runs at the same concurrency).  Prints the
outcome counts, latency percentiles (p50/p90/p99) per kind and the server's memory; ``--json`` saves
the report; the exit code is 0 only if every check passed.  The client uses only the standard library.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .processes import PeakRSS, free_port, rss_mib, stop

# word triples that repeat only after 504 requests: a cache of whole prompts gains nothing here, one
# of their shared opening (chat template, instruction) does, as with real traffic
NOUNS = ("dog", "ball", "cat", "bike", "team", "bench", "child", "boat")
VERBS = ("catch", "throw", "sleep", "ride", "score", "eat", "paint")
PLACES = ("beach", "window", "river", "rink", "park", "kitchen", "garden", "street", "lake")


def words_of(i: int) -> tuple[str, str, str]:
    return NOUNS[i % len(NOUNS)], VERBS[i % len(VERBS)], PLACES[i % len(PLACES)]

KINDS = ("completion", "chat-sample", "deal", "chat-stream", "deal-stream", "completion", "chat-deal",
         "bad-field", "over-limit", "bad-json")


@dataclass
class Result:
    kind: str
    outcome: str  # answered | refused | rejected | failed | not_sent
    status: int | None
    seconds: float
    first_chunk: float | None = None
    detail: str = ""


@dataclass
class _Spec:
    kind: str
    path: str
    body: bytes
    stream: bool = False
    expect_error: bool = False


def request_spec(i: int, model: str, max_tokens: int) -> _Spec:
    """The i-th request of the fixed mix (deterministic, so two runs send the same load)."""
    kind = KINDS[i % len(KINDS)]
    words = words_of(i)
    prompt = f"Write one short sentence that uses all of these words: {', '.join(words)}."
    messages = [{"role": "user", "content": prompt}]
    align = {"keywords": list(words), "beam": 2, "topk": 2, "lookahead": 1}
    base: dict[str, Any] = {"model": model, "max_tokens": max_tokens}
    body: dict[str, Any]
    if kind == "completion":
        path, body = "/v1/completions", {**base, "prompt": prompt}
    elif kind == "chat-sample":
        path, body = "/v1/chat/completions", {**base, "messages": messages, "temperature": 0.8, "seed": i}
    elif kind == "deal":
        path, body = "/v1/completions", {**base, "prompt": prompt, "alignment": align}
    elif kind == "chat-stream":
        path, body = "/v1/chat/completions", {**base, "messages": messages, "stream": True}
    elif kind == "deal-stream":
        path, body = "/v1/completions", {**base, "prompt": prompt, "alignment": align, "stream": True}
    elif kind == "chat-deal":
        path, body = "/v1/chat/completions", {**base, "messages": messages, "alignment": {**align, "max_words": 12}}
    elif kind == "bad-field":
        path, body = "/v1/completions", {**base, "prompt": prompt, "alignment": {"beams": 2}}
    elif kind == "over-limit":
        path, body = "/v1/completions", {**base, "prompt": prompt, "max_tokens": 10**6}
    else:  # bad-json
        return _Spec(kind, "/v1/chat/completions", b'{"model": "' + model.encode() + b'", "messages": [', expect_error=True)
    return _Spec(kind, path, json.dumps(body).encode(), stream=bool(body.get("stream")),
                 expect_error=kind in ("bad-field", "over-limit"))


class _Client:
    """One keep-alive connection per worker thread."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.conn: http.client.HTTPConnection | None = None

    def send(self, spec: _Spec, timeout: float) -> Result:
        start = time.perf_counter()
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
            self.conn.timeout = timeout
            if self.conn.sock is not None:
                self.conn.sock.settimeout(timeout)
            self.conn.request("POST", spec.path, body=spec.body, headers={"Content-Type": "application/json"})
            resp = self.conn.getresponse()
            if spec.stream and resp.status == 200:
                return self._read_stream(spec, resp, start)
            raw = resp.read()
            return _judge(spec, resp.status, raw, time.perf_counter() - start)
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            return Result(spec.kind, "failed", None, time.perf_counter() - start, detail=f"{type(exc).__name__}: {exc}")

    def _read_stream(self, spec: _Spec, resp, start: float) -> Result:
        first, pieces, error, done = None, 0, None, False
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[len(b"data: "):]
            if data == b"[DONE]":
                done = True
                continue
            event = json.loads(data)
            if "error" in event:
                error = event["error"]
            elif event.get("choices"):
                choice = event["choices"][0]
                if choice.get("text") or (choice.get("delta") or {}).get("content"):  # not the role chunk
                    pieces += 1
                    first = first if first is not None else time.perf_counter() - start
        seconds = time.perf_counter() - start
        if not done:
            return Result(spec.kind, "failed", 200, seconds, first, "stream ended without [DONE]")
        if error is not None:
            clean = error.get("type") in ("timeout", "server_busy") and error.get("message")
            return Result(spec.kind, "refused" if clean else "failed", 200, seconds, first, f"stream error: {error}")
        return Result(spec.kind, "answered", 200, seconds, first, f"{pieces} text chunks")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None


def _judge(spec: _Spec, status: int, raw: bytes, seconds: float) -> Result:
    try:
        body = json.loads(raw)
    except ValueError:
        return Result(spec.kind, "failed", status, seconds, detail=f"body is not JSON: {raw[:120]!r}")
    message = body.get("error", {}).get("message") if isinstance(body, dict) and isinstance(body.get("error"), dict) else None
    if status == 200 and not spec.expect_error:
        choice = (body.get("choices") or [{}])[0]
        text = choice.get("text") if "text" in choice else (choice.get("message") or {}).get("content")
        ok = isinstance(text, str) and choice.get("finish_reason") in ("stop", "length") and "alignment" in body
        return Result(spec.kind, "answered" if ok else "failed", status, seconds, detail="" if ok else f"bad body {body}")
    if status in (429, 503) and message:
        return Result(spec.kind, "refused", status, seconds, detail=message)
    if spec.expect_error and status == 400 and message:
        return Result(spec.kind, "rejected", status, seconds, detail=message)
    return Result(spec.kind, "failed", status, seconds, detail=f"unexpected {status}: {raw[:200]!r}")


def percentiles(values: list[float]) -> dict[str, float]:
    """Nearest-rank p50/p90/p99 (plus mean and max), in milliseconds."""
    if not values:
        return {"n": 0}
    s = sorted(values)

    def rank(p: float) -> float:
        return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))] * 1000

    return {"n": len(s), "p50": rank(50), "p90": rank(90), "p99": rank(99), "max": s[-1] * 1000,
            "mean": sum(s) / len(s) * 1000}


def _get_json(host: str, port: int, path: str, timeout: float = 5.0) -> Any:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def run_load(url: str, *, requests: int = 200, concurrency: int = 8, time_cap: float = 300.0, max_tokens: int = 16,
             warmup: int = 20, pid: int | None = None, max_rss_growth_mb: float = 64.0) -> dict[str, Any]:
    """Drive the server at ``url``; return the report (see the module docstring)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    model = _get_json(host, port, "/v1/models")["data"][0]["id"]
    # the warm-up runs at the test's concurrency, so the memory a full batch needs (rows x tokens of
    # KV cache, allocator arenas of every search thread) is in the baseline and growth means a leak
    warm_local = threading.local()
    warm_clients: list[_Client] = []

    def warm_one(i: int) -> Result:
        if not hasattr(warm_local, "client"):
            warm_local.client = _Client(host, port)
            warm_clients.append(warm_local.client)
        return warm_local.client.send(request_spec(i, model, max_tokens), timeout=time_cap)

    with ThreadPoolExecutor(concurrency) as pool:
        warm_results = list(pool.map(warm_one, range(warmup)))
    for c in warm_clients:
        c.close()
    rss_before = rss_mib(pid)

    deadline = time.monotonic() + time_cap
    local = threading.local()
    clients: list[_Client] = []

    finished = [0]
    rss_half: list[float | None] = [None]
    count_lock = threading.Lock()

    def one(i: int) -> Result:
        spec = request_spec(i, model, max_tokens)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return Result(spec.kind, "not_sent", None, 0.0, detail="time cap reached before it was sent")
        if not hasattr(local, "client"):
            local.client = _Client(host, port)
            clients.append(local.client)
        result = local.client.send(spec, timeout=remaining)
        with count_lock:
            finished[0] += 1
            if finished[0] == requests // 2:
                rss_half[0] = rss_mib(pid)
        return result

    start = time.perf_counter()
    with PeakRSS(pid, every=0.2) as sampler, ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    for c in clients:
        c.close()
    rss_after = rss_mib(pid)

    counts: dict[str, int] = {}
    by_kind: dict[str, dict[str, int]] = {}
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
        by_kind.setdefault(r.kind, {}).setdefault(r.outcome, 0)
        by_kind[r.kind][r.outcome] += 1
    answered = [r for r in results if r.outcome == "answered"]
    latency = {"answered": percentiles([r.seconds for r in answered])}
    for kind in dict.fromkeys(KINDS):
        latency[kind] = percentiles([r.seconds for r in results if r.kind == kind and r.outcome != "not_sent"])
    first = [r.first_chunk for r in answered if r.first_chunk is not None]
    growth = (rss_after - rss_before) if (rss_after is not None and rss_before is not None) else None
    # a leak keeps growing; a batch's working set (KV cache, allocator arenas) settles: judge the
    # second half of the run, so a working set still filling after the warm-up is not called a leak
    half = rss_half[0] if rss_half[0] is not None else rss_before
    late = (rss_after - half) if (rss_after is not None and half is not None) else None
    failures = [r for r in results if r.outcome in ("failed", "not_sent")]
    warm_failed = [r for r in warm_results if r.outcome == "failed"]
    memory_ok = late is None or late <= max_rss_growth_mb
    return {
        "url": url, "model": model, "requests": requests, "concurrency": concurrency, "time_cap_s": time_cap,
        "max_tokens": max_tokens, "warmup": warmup, "wall_s": wall, "throughput_rps": requests / wall if wall else 0.0,
        "outcomes": counts, "by_kind": by_kind, "latency_ms": latency,
        "stream_first_chunk_ms": percentiles(first),
        "rss_mb": {"before": rss_before, "half": half, "after": rss_after, "peak": sampler.peak or None,
                   "growth": growth, "second_half_growth": late, "allowed_growth": max_rss_growth_mb},
        "failures": [f"{r.kind}: {r.outcome} {r.status} {r.detail}" for r in (warm_failed + failures)[:10]],
        "ok": not failures and not warm_failed and memory_ok,
    }


class LocalServer:
    """``dealign serve`` in a subprocess on a free loopback port, stopped on exit."""

    def __init__(self, model: str, args: list[str] = (), startup_timeout: float = 600.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "dealign", "serve", "--model", model, "--host", "127.0.0.1",
               "--port", str(self.port), "--log-level", "warning", *args]
        self.log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty server never blocks on it
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        self._wait_ready(startup_timeout)

    def _wait_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dealign serve exited with code {self.proc.returncode}:\n{self.errors()[-2000:]}")
            try:
                if _get_json("127.0.0.1", self.port, "/health", timeout=2).get("status") == "ok":
                    return
            except (OSError, ValueError, http.client.HTTPException):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"dealign serve did not answer /health within {timeout:g} s")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def errors(self) -> str:
        """What the server wrote to stderr so far."""
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        stop(self.proc, grace=15)

    def __enter__(self) -> "LocalServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def render(report: dict[str, Any]) -> str:
    def fmt(p: dict) -> str:
        if not p.get("n"):
            return "-"
        return f"{p['p50']:8.0f} {p['p90']:8.0f} {p['p99']:8.0f} {p['max']:8.0f}  (n={p['n']})"

    rss = report["rss_mb"]
    lines = [
        f"load test: {report['requests']} requests, {report['concurrency']} concurrent, model {report['model']}, "
        f"max_tokens {report['max_tokens']}, cap {report['time_cap_s']:g} s",
        f"wall {report['wall_s']:.1f} s, {report['throughput_rps']:.2f} req/s; outcomes {report['outcomes']}",
        f"{'latency ms':<14} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}",
    ]
    for kind, p in report["latency_ms"].items():
        lines.append(f"{kind:<14} {fmt(p)}")
    lines.append(f"{'1st text (sse)':<14} {fmt(report['stream_first_chunk_ms'])}")
    if rss["before"] is not None:
        lines.append(f"server RSS MiB: before {rss['before']:.1f}, half-way {rss['half']:.1f}, after {rss['after']:.1f}, "
                     f"peak {rss['peak'] or 0:.1f}; growth {rss['growth']:+.1f}, in the second half "
                     f"{rss['second_half_growth']:+.1f} (allowed {rss['allowed_growth']:g})")
    for f in report["failures"]:
        lines.append(f"FAILED {f}")
    lines.append("PASS" if report["ok"] else "FAIL")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dealign.tools.loadtest", description=__doc__.split("\n\n")[0])
    target = ap.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="start `dealign serve --model MODEL` on a free loopback port")
    target.add_argument("--url", help="drive a running server instead")
    ap.add_argument("--pid", type=int, help="with --url: the server's process id, to watch its memory")
    ap.add_argument("--server-args", default="", help="extra `dealign serve` flags, e.g. '--queue-size 4 --threads 2'")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--time-cap", type=float, default=300.0, help="seconds for the whole run (warm-up excluded)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--max-rss-growth-mb", type=float, default=64.0, help="most RSS growth allowed over the second half")
    ap.add_argument("--json", type=Path, help="write the report here")
    args = ap.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.time_cap <= 0:
        ap.error("--requests, --concurrency and --time-cap must be positive")
    opts = dict(requests=args.requests, concurrency=args.concurrency, time_cap=args.time_cap,
                max_tokens=args.max_tokens, warmup=args.warmup, max_rss_growth_mb=args.max_rss_growth_mb)
    try:
        if args.model:
            with LocalServer(args.model, shlex.split(args.server_args)) as server:
                report = run_load(server.url, pid=server.pid, **opts)
        else:
            report = run_load(args.url, pid=args.pid, **opts)
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
