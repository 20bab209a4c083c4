"""The explorer page (``GET /`` of ``dealign serve``) in a real browser: headless Chromium from the
system (Debian's ``chromium``), driven by Playwright for Python, against the server on the tiny model.

Loads the page, runs greedy and DeAL, checks that the steps, candidates and the answer appear (the
answer the API gives for the same request), scrubs the timeline, triggers a server error and reads it
in the page, opens a trace file whose texts are HTML (shown as text, never run), and narrows the window.
Screenshots go to the test's folder.  Without Playwright or Chromium every test here skips, saying why.
"""

from __future__ import annotations

import json
import shutil

import pytest

from dealign.search import trace as tr
from dealign.server import ServerLimits
from dealign.server.app import create_app
from dealign.settings import Settings

from test_server import BODY, LoopbackServer, _post_later, _wait_for, gated  # noqa: E402,F401 (gated: a fixture)

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (pip install playwright)")

LIMITS = ServerLimits(max_tokens=24, max_candidates=64, max_prompt_tokens=128, timeout=60, queue_size=4)
PROMPT = "the dog catches a"
FORM = {"#keywords": "dog, frisbee", "#beam": "2", "#topk": "4", "#lookahead": "1", "#lam": "5", "#max-tokens": "8"}


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium on this machine (Debian: apt-get install chromium); the browser tests need one")


@pytest.fixture(scope="module")
def browser():
    path = _chromium()
    with sync_api.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=path, headless=True)
        except Exception as exc:  # noqa: BLE001 - a browser that will not start: skip with its reason
            pytest.skip(f"Chromium at {path} did not start under Playwright: {str(exc).splitlines()[0]}")
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tiny_aligner):
    srv = LoopbackServer(create_app(tiny_aligner, LIMITS, model_name="tiny"))
    yield srv
    srv.stop()


def _open(browser, url: str):
    """A page on the explorer at ``url``, once it has read the server's /health; and the list that
    collects the errors the page raises (none is allowed)."""
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.set_default_timeout(30_000)
    pg.goto(url + "/")
    sync_api.expect(pg.locator("#model")).to_contain_text("model tiny")
    return context, pg, errors


@pytest.fixture
def page(browser, server):
    context, pg, errors = _open(browser, server.url)
    yield pg
    context.close()
    assert not errors, f"the page raised: {errors}"


def _fill(page, values: dict[str, str]) -> None:
    page.fill("#prompt", PROMPT)
    for selector, value in values.items():
        page.fill(selector, value)


def test_a_search_runs_and_plays_back_step_by_step(page, tiny_aligner, tmp_path):
    expect = sync_api.expect
    _fill(page, FORM)
    page.click("#run")
    expect(page.locator("#status")).to_contain_text("Done", timeout=60_000)
    # the same answers the API gives for the same requests
    reward = Settings.from_values({"keywords": ["dog", "frisbee"], "weights": {"keywords": 1.0}}).build_reward()
    deal = tiny_aligner.generate(PROMPT, reward=reward, beam=2, topk=4, lookahead=1, lam=5.0, fluency=1.0, mode="token",
                                 max_new_tokens=8)
    greedy = tiny_aligner.generate(PROMPT, strategy="greedy", max_new_tokens=8)
    expect(page.locator("#deal-text")).to_have_text(deal.text)
    expect(page.locator("#greedy-text")).to_have_text(greedy.text)
    expect(page.locator("#cost")).to_contain_text("greedy's forward passes")
    n = deal.stats["steps"]
    expect(page.locator("#step-label")).to_have_text(f"step {n} of {n}")
    # the last step: its states, their candidates, kept and cut, the answer's path
    assert page.locator("#step-view details.state").count() >= 1
    assert page.locator("#step-view table.cands tbody tr").count() >= 4
    assert page.locator("#step-view tr.cut").count() >= 1
    assert page.locator("#chart polyline").count() == 3
    page.screenshot(path=str(tmp_path / "explorer.png"), full_page=True)
    # scrub back to the first step: one state (the empty answer), top-k 4 candidates, beam 2 kept
    page.locator("#slider").fill("0")
    expect(page.locator("#step-label")).to_have_text(f"step 1 of {n}")
    expect(page.locator("#step-title")).to_contain_text("Step 1: 1 state, 4 candidates, 2 kept")
    assert page.locator("#step-view tr.kept").count() == 2
    assert page.locator("#step-view tr.path").count() == 1
    assert not page.locator("#follow").is_checked()
    page.click("#next")
    expect(page.locator("#step-label")).to_have_text(f"step 2 of {n}")
    page.uncheck("#show-cut")
    assert page.locator("#step-view tr.cut").first.is_hidden()
    # a click on the chart goes to that step
    page.locator("#chart rect.pt").first.click()
    expect(page.locator("#step-label")).to_have_text(f"step 1 of {n}")
    page.screenshot(path=str(tmp_path / "explorer-step1.png"), full_page=True)
    assert (tmp_path / "explorer.png").stat().st_size > 10_000


def test_server_errors_are_shown_in_words(page, tmp_path):
    expect = sync_api.expect
    _fill(page, {**FORM, "#beam": "50"})  # 50 x 4 x 1 candidates: over the server's --max-candidates
    page.click("#run")
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("HTTP 400")
    expect(error).to_contain_text("the search is too wide")
    page.screenshot(path=str(tmp_path / "explorer-error.png"), full_page=True)
    # a bad regular expression, then a good run clears the error
    _fill(page, {**FORM, "#must-match": "(unclosed"})
    page.click("#run")
    expect(error).to_contain_text("invalid regular expression")
    _fill(page, {**FORM, "#must-match": ""})
    page.click("#run")
    expect(page.locator("#status")).to_contain_text("Done", timeout=60_000)
    expect(error).to_be_hidden()


def test_a_busy_server_and_the_time_limit_are_shown_in_words(browser, gated, tmp_path):
    expect = sync_api.expect
    (srv, aligner), results = gated, []
    context, pg, errors = _open(browser, srv.url)
    try:
        _fill(pg, FORM)
        aligner.gate.clear()  # one search holds the worker and one waits: the queue (1) is full
        threads = [_post_later(srv.url, BODY, results)]
        _wait_for(srv.url, 1, 0)
        threads.append(_post_later(srv.url, BODY, results))
        _wait_for(srv.url, 1, 1)
        pg.click("#run")
        expect(pg.locator("#error")).to_contain_text("The server is busy (HTTP 429)")
        expect(pg.locator("#error")).to_contain_text("retry shortly")
        expect(pg.locator("#run")).to_be_enabled()
        aligner.gate.set()
        for t in threads:
            t.join(30)
        aligner.delay = 0.4  # each step 0.4 s: 8 tokens run past the 1.5 s time limit
        pg.click("#run")
        expect(pg.locator("#error")).to_contain_text("The server could not answer in time (HTTP 503)", timeout=20_000)
        expect(pg.locator("#error")).to_contain_text("time limit")
        pg.screenshot(path=str(tmp_path / "explorer-timeout.png"), full_page=True)
    finally:
        aligner.gate.set()
        aligner.delay = 0.0
        context.close()
    assert not errors, f"the page raised: {errors}"


def test_stop_cancels_the_run(browser, gated):
    expect = sync_api.expect
    (srv, aligner) = gated
    context, pg, errors = _open(browser, srv.url)
    try:
        _fill(pg, FORM)
        aligner.gate.clear()  # the searches wait: the run is in flight until stopped
        pg.click("#run")
        expect(pg.locator("#stop")).to_be_enabled()
        _wait_for(srv.url, 1, 1)
        pg.click("#stop")
        expect(pg.locator("#status")).to_have_text("Stopped.")
        expect(pg.locator("#run")).to_be_enabled()
        expect(pg.locator("#stop")).to_be_disabled()
        expect(pg.locator("#error")).to_be_hidden()
    finally:
        aligner.gate.set()
        context.close()
    assert not errors, f"the page raised: {errors}"


def test_a_trace_file_opens_and_its_text_is_never_html(page, tiny_aligner, tmp_path):
    expect = sync_api.expect
    doc = tiny_aligner.generate(PROMPT, beam=2, topk=3, lookahead=1, max_new_tokens=4, trace=True).trace
    evil = '<img src=x id="injected" onerror="document.title=\'pwned\'">'
    doc["steps"][0]["candidates"][0]["text"] = evil
    doc["steps"][0]["candidates"][0]["lookahead"] = "<b id='bold'>x</b>"
    doc["answer"]["text"] = evil
    path = tr.save(doc, tmp_path / "trace.json")
    page.set_input_files("#trace-file", str(path))
    expect(page.locator("#status")).to_contain_text("Opened trace.json")
    expect(page.locator("#deal-text")).to_have_text(evil)
    page.locator("#slider").fill("0")
    expect(page.locator("#step-view")).to_contain_text("<b id='bold'>x</b>")
    assert page.locator("#injected").count() == 0 and page.locator("#bold").count() == 0
    assert page.title() == "dealign explorer"
    # a file that is not a trace: an error in words
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"hello": 1}))
    page.set_input_files("#trace-file", str(bad))
    expect(page.locator("#error")).to_contain_text("not a dealign trace")


def test_the_page_fits_a_narrow_window(page, tmp_path):
    page.set_viewport_size({"width": 420, "height": 900})
    _fill(page, FORM)
    page.click("#run")
    sync_api.expect(page.locator("#status")).to_contain_text("Done", timeout=60_000)
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 1, f"the page is {overflow}px wider than a 420px window"
    page.screenshot(path=str(tmp_path / "explorer-narrow.png"), full_page=True)
