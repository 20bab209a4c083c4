"""The remote backend in the vLLM dialect, against a stand-in server with vLLM's exact completions
schema backed by a tiny local model: the search through HTTP must equal the local backend token for
token, requests of a step overlap, and every way an engine can fall short gets a clear error."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from dealign import Aligner, SearchConfig
from dealign.backends.hf import HFBackend
from dealign.tools.processes import free_port
from dealign.backends.remote import RemoteBackend, RemoteEngineError
from dealign.rewards.base import as_reward
from dealign.search import run_search

from conftest import PROMPT, SEARCH_CONFIGS, EosBoost, build_model, letters  # noqa: E402
from fake_vllm import FakeVLLM  # noqa: E402


@pytest.fixture(scope="module")
def boosted(tiny_model, tiny_tokenizer, prompt_ids):
    """EOS becomes likely late in the answer, so finished states are exercised too."""
    return EosBoost(tiny_model, tiny_tokenizer.eos_token_id, 3.0, from_pos=len(prompt_ids) + 4)


@pytest.fixture(scope="module")
def engine(boosted, tiny_tokenizer):
    with FakeVLLM(boosted, tiny_tokenizer) as server:
        yield server


@pytest.fixture()
def remote(engine, tiny_tokenizer):
    backend = RemoteBackend(engine.url, tiny_tokenizer, dialect="vllm", top_n=8)
    yield backend
    backend.close()


def search(backend, ids, cfg, reward=letters):
    return run_search(backend, ids, as_reward(reward), cfg, prompt_text=PROMPT)


CONFIGS = {
    "greedy": SearchConfig(strategy="greedy", max_new_tokens=10),
    "beam": SearchConfig(strategy="beam", beam=3, max_new_tokens=6),
    **SEARCH_CONFIGS,
    "default": SearchConfig(max_new_tokens=8),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_remote_search_equals_the_local_backend(boosted, tiny_tokenizer, remote, prompt_ids, name):
    cfg = CONFIGS[name]
    local = search(HFBackend(boosted, tiny_tokenizer), prompt_ids, cfg)
    far = search(remote, prompt_ids, cfg)
    assert far.best.token_ids == local.best.token_ids
    assert far.best.finished == local.best.finished
    assert math.isclose(far.best.score, local.best.score, rel_tol=1e-4, abs_tol=1e-4)
    assert [h.token_ids for h in far.beam] == [h.token_ids for h in local.beam]
    assert far.stats.steps == local.stats.steps
    # the engine's sequential decode steps are counted like the local forward passes (a row that is
    # already finished is not sent, so a step may count one fewer)
    assert local.stats.forward_passes - far.stats.steps <= far.stats.forward_passes <= local.stats.forward_passes


def test_commit_inside_a_rollout_knows_the_next_distribution(boosted, tiny_tokenizer, remote, prompt_ids):
    """keep < n_fed: every fed position's top-n is kept, so no new request is needed."""
    local = HFBackend(boosted, tiny_tokenizer)
    lb, rb = local.prefill(prompt_ids), remote.prefill(prompt_ids)
    forced = torch.tensor([[int(t)] for t in lb.next_logprobs[0].topk(3).indices])
    lro = local.rollout(lb, [0, 0, 0], forced, 3, feed_last=True)
    rro = remote.rollout(rb, [0, 0, 0], forced, 3, feed_last=True)
    assert rro.tokens.tolist() == lro.tokens.tolist() and rro.n_fed == lro.n_fed == 4
    torch.testing.assert_close(rro.logprobs, lro.logprobs, atol=1e-4, rtol=1e-4)
    before = remote.counters.requests
    for keep in (1, 2, 4):
        rows = [r for r in range(3) if rro.length[r] >= keep and not (rro.finished[r] and rro.length[r] <= keep)] or [0]
        lbeam, rbeam = local.commit(lro, rows, keep), remote.commit(rro, rows, keep)
        assert rbeam.ids == lbeam.ids
        top = rbeam.next_logprobs.topk(8)
        assert top.indices.tolist() == lbeam.next_logprobs.topk(8).indices.tolist()
        torch.testing.assert_close(top.values, lbeam.next_logprobs.gather(1, top.indices), atol=1e-4, rtol=1e-4)
        assert torch.isinf(rbeam.next_logprobs).sum(1).tolist() == [remote.vocab_size - 8] * len(rows)
    assert remote.counters.requests == before


def test_requests_of_a_step_are_concurrent(engine, tiny_tokenizer, prompt_ids):
    engine.delay, engine.max_in_flight = 0.05, 0
    backend = RemoteBackend(engine.url, tiny_tokenizer, dialect="vllm", top_n=8, concurrency=8)
    try:
        result = search(backend, prompt_ids, SearchConfig(beam=2, topk=4, lookahead=2, max_new_tokens=4))
    finally:
        engine.delay = 0.0
        backend.close()
    assert engine.max_in_flight >= 4
    assert result.stats.steps >= 1
    # a step is one round trip of beam x topk requests, not one request after another
    snap = backend.counters.snapshot()
    assert snap["round_trips"] < snap["requests"]


def test_wire_format_is_token_ids_with_logprobs(engine, remote, prompt_ids):
    engine.bodies.clear()
    remote.prefill(prompt_ids)
    body = engine.bodies[-1]
    assert body["prompt"] == list(prompt_ids)  # ids, never text
    assert body["logprobs"] == 8 and body["return_tokens_as_token_ids"] is True and body["model"] == "tiny"


def test_sampling_runs_on_the_engine_reproducibly(remote, prompt_ids):
    cfg = SearchConfig(strategy="best-of-n", n=4, temperature=1.0, max_new_tokens=6, seed=3)
    a, b = search(remote, prompt_ids, cfg), search(remote, prompt_ids, cfg)
    assert [h.token_ids for h in a.beam] == [h.token_ids for h in b.beam]
    assert len({tuple(h.token_ids) for h in a.beam}) > 1  # the rows got different seeds / samples


def test_aligner_from_remote_equals_local(tiny_aligner, tiny_tokenizer, engine, tiny_model):
    with FakeVLLM(tiny_model, tiny_tokenizer) as plain:
        far = Aligner.from_remote(plain.url, dialect="vllm", tokenizer=tiny_tokenizer, top_n=6)
        for cfg in (SearchConfig(strategy="greedy", max_new_tokens=8), SearchConfig(max_new_tokens=6, lookahead=2)):
            r1 = tiny_aligner.generate("a dog on the beach", reward=letters, search=cfg)
            r2 = far.generate("a dog on the beach", reward=letters, search=cfg)
            assert r2.token_ids == r1.token_ids and r2.text == r1.text
        assert r2.stats["requests"] > 0 and r2.stats["round_trips"] > 0
        # unless told otherwise a remote search commits whole segments (round trips dominate); explicit settings win
        # (a local aligner reads the fluency term by default, which a remote engine cannot: compare without it)
        plain_deal = {"fluency": 0.0, "lam": 20.0}
        seg = tiny_aligner.generate("a dog on the beach", reward=letters, max_new_tokens=8, mode="segment", lookahead=4,
                                    **plain_deal)
        assert far.generate("a dog on the beach", reward=letters, max_new_tokens=8).token_ids == seg.token_ids
        tok = tiny_aligner.generate("a dog on the beach", reward=letters, max_new_tokens=6, **plain_deal)
        assert far.generate("a dog on the beach", reward=letters, max_new_tokens=6, mode="token", lookahead=1).token_ids == tok.token_ids
        with pytest.raises(ValueError, match="topk 7 is more than the 6 log-probabilities"):
            far.generate("a dog", search=SearchConfig(topk=7))


# errors ------------------------------------------------------------------------------------------
def test_unreachable_engine(tiny_tokenizer):
    with pytest.raises(RemoteEngineError, match="cannot reach the engine at http://127.0.0.1"):
        RemoteBackend(f"http://127.0.0.1:{free_port()}", tiny_tokenizer, dialect="vllm")


def test_logprob_cap_below_top_n(boosted, tiny_tokenizer):
    with FakeVLLM(boosted, tiny_tokenizer, max_logprobs=5) as capped:
        with pytest.raises(RemoteEngineError, match="--max-logprobs 8"):
            RemoteBackend(capped.url, tiny_tokenizer, dialect="vllm", top_n=8)


def test_wrong_dialect_and_wrong_model_name(engine, tiny_tokenizer):
    with pytest.raises(RemoteEngineError, match="--engine-dialect"):
        RemoteBackend(engine.url, tiny_tokenizer, dialect="llamacpp")
    with pytest.raises(RemoteEngineError, match="--engine-model"):
        RemoteBackend(engine.url, tiny_tokenizer, dialect="vllm", model="gpt-9")
    with pytest.raises(ValueError, match="dialect must be one of"):
        RemoteBackend(engine.url, tiny_tokenizer, dialect="sglang")


def test_a_different_tokenizer_is_refused(engine, tiny_tokenizer):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["completely different text here"] * 3, vocab_size=280, special_tokens=["<|endoftext|>"])
    other = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    with pytest.raises(RemoteEngineError, match="tokenises text differently|outside the tokenizer's vocabulary"):
        RemoteBackend(engine.url, other, dialect="vllm", top_n=4)


def test_a_draft_model_is_refused(remote, prompt_ids):
    beam = remote.prefill(prompt_ids)
    with pytest.raises(ValueError, match="draft"):
        remote.rollout(beam, [0], torch.tensor([[5, 6]]), 0)


def test_cli_generate_through_the_engine(engine, tiny_model_dir, tiny_model, tiny_tokenizer, tmp_path):
    with FakeVLLM(tiny_model, tiny_tokenizer) as plain:
        cmd = [sys.executable, "-m", "dealign", "generate", "a dog on the beach", "--model", str(tiny_model_dir),
               "--engine-url", plain.url, "--engine-dialect", "vllm", "--engine-top-n", "6", "--strategy", "greedy",
               "--max-new-tokens", "6"]
        far = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert far.returncode == 0, far.stderr
        local = subprocess.run(cmd[:7] + cmd[13:], capture_output=True, text=True, timeout=300)
        assert local.returncode == 0, local.stderr
        assert far.stdout == local.stdout
    bad = subprocess.run(cmd[:7] + ["--engine-url", f"http://127.0.0.1:{free_port()}", "--engine-dialect", "vllm"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "error: cannot reach the engine" in bad.stderr and "Traceback" not in bad.stderr
    usage = subprocess.run(cmd[:7] + ["--engine-dialect", "vllm"], capture_output=True, text=True, timeout=300)
    assert usage.returncode == 2 and "need --engine-url" in usage.stderr


def test_cli_batch_through_the_engine(tiny_model_dir, tiny_model, tiny_tokenizer, tmp_path):
    rows = tmp_path / "in.jsonl"
    rows.write_text('{"prompt": "a dog on the beach"}\n{"prompt": "the cat sleeps", "keywords": "mat"}\n')
    with FakeVLLM(tiny_model, tiny_tokenizer) as plain:
        outs = []
        for extra in (["--engine-url", plain.url, "--engine-dialect", "vllm", "--engine-top-n", "6"], []):
            out = tmp_path / f"out{len(outs)}.jsonl"
            done = subprocess.run([sys.executable, "-m", "dealign", "generate", "--input", str(rows), "--output", str(out),
                                   "--model", str(tiny_model_dir), "--max-new-tokens", "6", "--mode", "token", "--lookahead", "2",
                                   "--fluency", "0", "--lam", "20", *extra],
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr
            outs.append([json.loads(line) for line in out.read_text().splitlines()])
    assert [r["text"] for r in outs[0]] == [r["text"] for r in outs[1]]
