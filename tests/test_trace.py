"""The search trace (search/trace.py, docs/trace.md): recording it never changes the answer, it holds
every step's beam and candidates with their numbers, marks the answer's path, round-trips as JSON and
carries its format and version; ``generate(trace=...)`` streams its parts; ``--trace FILE`` writes it."""

from __future__ import annotations

import json
import math

import pytest

from dealign.rewards import from_options
from dealign.search import SearchConfig, run_search
from dealign.search import trace as tr
from dealign.search.trace import TraceRecorder

from conftest import PROMPT, SEARCH_CONFIGS, EosBoost  # noqa: E402

REWARD = dict(keywords=["dog", "frisbee"], max_words=6)
CONFIGS = {
    **SEARCH_CONFIGS,
    "token-wide": SearchConfig(beam=4, topk=8, lookahead=2, lam=5.0, max_new_tokens=8),
    "segment-L2": SearchConfig(mode="segment", beam=2, topk=3, lookahead=2, lam=5.0, max_new_tokens=8),
    "greedy": SearchConfig(strategy="greedy", max_new_tokens=8),
    "beam": SearchConfig(strategy="beam", beam=3, max_new_tokens=8),
    "best-of-n": SearchConfig(strategy="best-of-n", n=3, max_new_tokens=8),
}


def _run(backend, ids, cfg, trace=None):
    return run_search(backend, ids, from_options(**REWARD), cfg, prompt_text=PROMPT, trace=trace)


def _same(a, b) -> None:
    assert a.best.token_ids == b.best.token_ids and a.best.text == b.best.text
    assert a.best.score == b.best.score and a.best.reward == b.best.reward
    assert [h.token_ids for h in a.beam] == [h.token_ids for h in b.beam]
    assert a.stats.forward_passes == b.stats.forward_passes


@pytest.fixture(scope="module")
def eos_model(tiny_model, tiny_tokenizer, prompt_ids):
    """End-of-sequence likely after a few tokens: finished states are held in the beam."""
    return EosBoost(tiny_model, tiny_tokenizer.eos_token_id, 3.5, from_pos=len(prompt_ids) + 3)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("eos", [False, True], ids=["no-eos-boost", "eos-boost"])
def test_recording_a_trace_changes_nothing(tiny_model, eos_model, tiny_tokenizer, prompt_ids, name, eos):
    from dealign.backends.hf import HFBackend

    backend = HFBackend(eos_model if eos else tiny_model, tiny_tokenizer)
    cfg = CONFIGS[name]
    plain = _run(backend, prompt_ids, cfg)
    rec = TraceRecorder(backend.decode, prompt=PROMPT, strategy=cfg.strategy, settings=cfg.to_dict())
    traced = _run(backend, prompt_ids, cfg, rec)
    _same(plain, traced)
    assert plain.trace is None
    doc = traced.trace
    assert doc["format"] == "dealign-trace" and doc["version"] == tr.VERSION
    assert json.loads(json.dumps(doc)) == doc  # plain JSON: round-trips exactly
    assert doc["answer"]["text"] == traced.best.text
    assert doc["stats"]["steps"] == len(doc["steps"]) > 0
    path = doc["answer"]["path"]
    assert path and len(path) <= len(doc["steps"])
    assert all(j < len(doc["steps"][i]["candidates"]) for i, j in enumerate(path))
    for step in doc["steps"]:
        kept = [c for c in step["candidates"] if c["kept"]]
        held = [h for h in step["held"] if h["kept"]]
        assert 1 <= len(kept) + len(held) <= (cfg.beam if cfg.strategy in ("deal", "beam") else 1)
        assert all(0 <= c["parent"] < len(step["states"]) for c in step["candidates"])
    # the answer's path runs through kept candidates, each the child of the state its predecessor became
    for i, j in enumerate(path[:-1]):
        step, nxt = doc["steps"][i], doc["steps"][i + 1]
        cand, child = step["candidates"][j], nxt["candidates"][path[i + 1]]
        assert cand["kept"]
        grown = step["states"][cand["parent"]]["text"] + cand["text"] + (cand["lookahead"] if step["mode"] == "segment" else "")
        assert nxt["states"][child["parent"]]["text"] == grown


def test_a_deal_step_holds_every_candidate_with_its_score_parts(tiny_model, tiny_tokenizer, prompt_ids):
    from dealign.backends.hf import HFBackend

    backend = HFBackend(tiny_model, tiny_tokenizer)
    cfg = SearchConfig(beam=3, topk=4, lookahead=2, lam=5.0, max_new_tokens=6, early_stop=False)
    result = _run(backend, prompt_ids, cfg, TraceRecorder(backend.decode, lam=cfg.lam))
    first, second = result.trace["steps"][:2]
    assert len(first["states"]) == 1 and first["states"][0] == {"text": "", "tokens": 0, "logprob": 0.0}
    assert len(first["candidates"]) == 4 and sum(c["kept"] for c in first["candidates"]) == 3
    assert len(second["states"]) == 3 and len(second["candidates"]) == 12
    for c in first["candidates"] + second["candidates"]:
        assert math.isclose(c["score"], c["logp_part"] + c["reward_part"], rel_tol=1e-9, abs_tol=1e-9)
        assert math.isclose(c["reward_part"], cfg.lam * c["reward"], rel_tol=1e-9, abs_tol=1e-12)
        assert set(c["rewards"]) == {"keywords", "max_words", "well_formed", "finish_with_keywords"}
        assert c["text"] and c["lookahead"] is not None
    ranks = sorted((c["rank"], c["kept"]) for c in second["candidates"])
    assert [k for _, k in ranks] == [True] * 3 + [False] * 9  # the best three ranks survive
    # the states of step 2 are the kept candidates of step 1, texts included
    kept_texts = {first["states"][0]["text"] + c["text"] for c in first["candidates"] if c["kept"]}
    assert {s["text"] for s in second["states"]} == kept_texts


def test_greedy_trace_is_one_candidate_per_token(tiny_aligner):
    result = tiny_aligner.generate(PROMPT, strategy="greedy", max_new_tokens=6, trace=True)
    doc = result.trace
    assert doc["strategy"] == "greedy" and len(doc["steps"]) == result.num_tokens
    assert all(len(s["candidates"]) == 1 and s["candidates"][0]["kept"] for s in doc["steps"])
    assert "".join(s["candidates"][0]["text"] for s in doc["steps"]).strip() == result.text.strip()
    assert math.isclose(doc["steps"][-1]["candidates"][0]["logprob"], result.logprob, rel_tol=1e-5)


def test_generate_streams_the_trace_parts_in_order(tiny_aligner):
    events = []
    result = tiny_aligner.generate(PROMPT, reward=from_options(**REWARD), beam=2, topk=3, lookahead=1,
                                   max_new_tokens=5, trace=events.append)
    assert [e["type"] for e in events] == ["begin"] + ["step"] * len(result.trace["steps"]) + ["end"]
    begin = events[0]
    assert begin["prompt"] == PROMPT and begin["settings"]["beam"] == 2 and begin["lam"] == result.trace["lam"]
    assert set(begin["rewards"]) == {"keywords", "max_words", "well_formed", "finish_with_keywords"}
    assert [{k: v for k, v in e.items() if k != "type"} for e in events[1:-1]] == result.trace["steps"]
    assert events[-1]["answer"] == result.trace["answer"]
    # and the same answer as without
    plain = tiny_aligner.generate(PROMPT, reward=from_options(**REWARD), beam=2, topk=3, lookahead=1, max_new_tokens=5)
    assert plain.text == result.text and plain.trace is None and plain.score == result.score


def test_trace_file_round_trips_and_wrong_files_are_refused(tmp_path, tiny_aligner):
    doc = tiny_aligner.generate(PROMPT, max_new_tokens=4, beam=2, topk=2, trace=True).trace
    path = tr.save(doc, tmp_path / "t" / "trace.json")
    assert tr.load(path) == doc
    with pytest.raises(ValueError, match="not a dealign trace"):
        tr.check({"steps": []})
    with pytest.raises(ValueError, match="version 99"):
        tr.check({**doc, "version": 99})
