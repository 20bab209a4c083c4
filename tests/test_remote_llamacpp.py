"""The remote backend against a real engine: llama.cpp's ``llama-server`` (built by
``scripts/build-llama-server.sh``; ``make test`` builds it once) serving the packaged SmolLM2 GGUF on
loopback, next to the local backend on the same GGUF de-quantised to fp32.

The two engines do not compute the same numbers (llama.cpp multiplies the Q4_1 weights with 8-bit
quantised activations; the local model runs the de-quantised weights in fp32), so the tests check the
tokens are the same *where the engines agree on log-probs*: every token the server picks is the local
model's most likely token, or within a small log-prob margin of it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dealign import Aligner, SearchConfig
from dealign.tools.llama_server import BUILD_SCRIPT, LlamaServer, llama_server_binary, missing_build_tools
from dealign.evaluation.data import commongen
from dealign.rewards import keywords

pytestmark = pytest.mark.integration

MARGIN = 0.35  # nats: how far apart two engines' log-probs may be for a token choice to count as a tie


@pytest.fixture(scope="module")
def server_binary():
    binary = llama_server_binary()
    if binary is None:
        missing = missing_build_tools()
        if missing:
            pytest.skip(f"llama-server is not built and the build tools are missing ({', '.join(missing)}): install "
                        f"cmake and a C++17 compiler, then run {BUILD_SCRIPT} (make test does)")
        env = {**os.environ, "PIP": f"{sys.executable} -m pip"}
        done = subprocess.run(["bash", BUILD_SCRIPT], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            pytest.fail(f"{BUILD_SCRIPT} failed:\n{done.stderr[-3000:]}")
        binary = llama_server_binary()
    return binary


@pytest.fixture(scope="module")
def gguf():
    from dealign.models.loading import packaged_gguf

    return packaged_gguf("smollm2")


@pytest.fixture(scope="module")
def engine(server_binary, gguf):
    with LlamaServer(gguf, binary=server_binary, threads=1, parallel=16, ctx_per_slot=512) as server:
        yield server


@pytest.fixture(scope="module")
def local():
    torch.set_num_threads(1)  # the server has the other core
    return Aligner.from_pretrained()


@pytest.fixture(scope="module")
def far(engine):
    aligner = Aligner.from_remote(engine.url, dialect="llamacpp")
    yield aligner
    aligner.backend.close()


def local_logprobs(aligner, prompt_ids, answer):
    """The local model's next-token log-probs along ``answer`` (teacher-forced): [len(answer), vocab]."""
    ids = torch.tensor([list(prompt_ids) + list(answer)])
    with torch.inference_mode():
        logits = aligner.backend.model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits, -1)


def explained_by_agreement(aligner, prompt_ids, remote_answer) -> tuple[bool, float]:
    """Does every token of the remote greedy answer win locally too, or lose by less than MARGIN?"""
    lp = local_logprobs(aligner, prompt_ids, remote_answer)
    gaps = [float(lp[i].max() - lp[i, t]) for i, t in enumerate(remote_answer)]
    return max(gaps) <= MARGIN, max(gaps)


def test_wire_format_of_this_llama_server(engine):
    """The response format the dialect relies on (newer llama.cpp: ids and log-probs per token)."""
    import httpx

    body = {"prompt": [1, 9690, 198], "n_predict": 2, "n_probs": 5, "cache_prompt": True, "temperature": 0,
            "return_tokens": True}
    data = httpx.post(engine.url + "/completion", json=body, timeout=60).json()
    first = data["completion_probabilities"][0]
    assert {"id", "logprob", "top_logprobs"} <= set(first)
    assert len(first["top_logprobs"]) == 5 and {"id", "logprob"} <= set(first["top_logprobs"][0])
    assert first["id"] == first["top_logprobs"][0]["id"]  # greedy picks the top entry
    assert data["tokens"] == [p["id"] for p in data["completion_probabilities"]]


def test_greedy_through_llama_server_matches_local_where_engines_agree(engine, local, far):
    """Greedy on CommonGen prompts: identical tokens, or a divergence at a near-tie of the two engines."""
    cfg = SearchConfig(strategy="greedy", max_new_tokens=20)
    identical = 0
    for cs in commongen(4):
        a = local.generate(cs.prompt, search=cfg)
        b = far.generate(cs.prompt, search=cfg)
        ids, _ = local.encode_prompt(cs.prompt)
        if a.token_ids == b.token_ids:
            identical += 1
            assert abs(a.logprob - b.logprob) < 0.1 * max(1, len(a.token_ids))  # same tokens, near the same log-prob
        else:
            ok, gap = explained_by_agreement(local, ids, b.token_ids)
            assert ok, f"the server's greedy answer departs from the local model by {gap:.2f} nats: {b.text!r}"
        assert b.stats["requests"] == 2  # a prefill, then one request for the whole answer
    assert identical >= 2


def test_deal_through_llama_server(engine, local, far):
    """DeAL (token and segment mode) runs on the server: it covers the keywords as well as the
    local search, and its answer's log-prob is the local model's within the engines' disagreement."""
    cs = commongen(1)[0]
    reward = keywords(cs.keywords)
    for cfg in (SearchConfig(max_new_tokens=16), SearchConfig(mode="segment", lookahead=4, max_new_tokens=16)):
        b = far.generate(cs.prompt, reward=reward, search=cfg)
        a = local.generate(cs.prompt, reward=reward, search=cfg)
        assert b.text and b.token_ids
        assert b.reward >= a.reward - 0.34  # at most one keyword fewer than the local search
        ids, _ = local.encode_prompt(cs.prompt)
        lp = local_logprobs(local, ids, b.token_ids)
        local_lp = float(lp.gather(1, torch.tensor(b.token_ids)[:, None]).sum())
        assert abs(local_lp - b.logprob) < 0.1 * len(b.token_ids) + 0.5
        assert b.stats["requests"] > b.stats["round_trips"]  # the requests of a step went together
        if a.token_ids == b.token_ids:
            assert abs(a.score - b.score) < 0.1 * len(a.token_ids) + 0.5


def test_unreachable_llama_server_is_a_clear_error():
    from dealign.tools.processes import free_port
    from dealign.backends.remote import RemoteEngineError

    with pytest.raises(RemoteEngineError, match="cannot reach the engine"):
        Aligner.from_remote(f"http://127.0.0.1:{free_port()}")
