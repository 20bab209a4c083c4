"""A serving engine over HTTP as a search backend: token-id prompts in, top-n log-probabilities out.

The search stays on the client; every forward pass happens on the engine.  Two dialects:

* ``"llamacpp"`` — llama.cpp's ``llama-server``: ``POST /completion`` with an int-array ``prompt``,
  ``n_predict``, ``n_probs`` and ``cache_prompt`` (the slot keeps the prompt's KV cache, so a
  request that extends an earlier one only evaluates the new tokens);
* ``"vllm"`` — vLLM's OpenAI server (SGLang speaks it too): ``POST /v1/completions`` with a token-id
  ``prompt``, ``logprobs``, ``return_tokens_as_token_ids`` (tokens come back as ``"token_id:123"``)
  and ``return_token_ids``; prefix caching is the engine's (``--enable-prefix-caching``).

Token ids stay exact end to end: the chat template and the tokenizer run on the client, the engine
only ever sees and returns ids.  A row of a rollout is one request (``prompt = row ids + forced
token``, ``n_predict = lookahead``); the requests of a step go out concurrently.  The next-token
distribution the search needs is the engine's top-n entries as a dense tensor (-inf elsewhere), so
the search code is the same as for a local model; it is exact for every action the search proposes as
long as ``top_n >= topk``.  Each generated position's top-n is kept with the rollout, so a commit at
any fed position knows the next distribution without another request; ``feed_last`` asks for one
token more than the rollout needs and keeps only its distribution.

Round trips dominate the cost of a remote search, so ``mode="segment"`` (one request per candidate
per segment of ``lookahead`` tokens) is the recommended mode for a remote engine.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..errors import RemoteEngineError
from .base import Backend, Beam, Counters, Rollout, Sampler, eos_ids_of

DIALECTS = ("llamacpp", "vllm")
_NEG = -1e30  # llama.cpp writes log(0) as the lowest float (JSON has no -inf)


@dataclass
class Completion:
    """One row's answer: generated ids, each one's log-prob, and for each generated position the
    distribution it was drawn from (its top-n as ``(ids, logprobs)``), in order."""

    tokens: list[int]
    logprobs: list[float]
    top: list[tuple[list[int], list[float]]]
    prompt_evaluated: int | None = None  # prompt tokens the engine computed (not taken from its cache)


@dataclass
class RemoteCounters(Counters):
    """``forward_passes`` counts sequential decode steps on the engine (as the local backend does);
    ``requests`` HTTP requests, ``round_trips`` batches of concurrent requests the search waited on."""

    requests: int = 0
    round_trips: int = 0

    def snapshot(self) -> dict:
        return {**super().snapshot(), "requests": self.requests, "round_trips": self.round_trips}


# dialects --------------------------------------------------------------------------------------------
class _Dialect:
    name = ""
    endpoint = ""

    def __init__(self, model: str | None) -> None:
        self.model = model

    def payload(self, prompt: list[int], n_predict: int, top_n: int, n: int, temperature: float, top_p: float,
                seed: int | None) -> dict:
        raise NotImplementedError

    def parse(self, data: dict) -> list[Completion]:
        raise NotImplementedError


class _LlamaCpp(_Dialect):
    """llama.cpp ``/completion``: one completion per request (``n`` is not supported there)."""

    name, endpoint = "llamacpp", "/completion"

    def payload(self, prompt, n_predict, top_n, n, temperature, top_p, seed):
        assert n == 1
        body = {
            "prompt": prompt, "n_predict": n_predict, "n_probs": top_n, "cache_prompt": True, "stream": False,
            "post_sampling_probs": False, "return_tokens": True, "temperature": temperature,
            # every other sampler neutral, so temperature / top-p are the whole sampling chain
            "top_k": 0, "top_p": top_p, "min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0,
            "presence_penalty": 0.0, "frequency_penalty": 0.0, "dry_multiplier": 0.0, "xtc_probability": 0.0,
            "mirostat": 0,
        }
        if seed is not None:
            body["seed"] = seed
        return body

    def parse(self, data):
        probs = data.get("completion_probabilities")
        if probs is None:
            raise RemoteEngineError(
                "the llama.cpp server returned no completion_probabilities; it needs n_probs support "
                "(llama.cpp b4000 or later)")
        tokens, lps, top = [], [], []
        for entry in probs:
            if "top_logprobs" not in entry or "id" not in entry:
                raise RemoteEngineError(
                    "the llama.cpp server's completion_probabilities lack 'id'/'top_logprobs'; this dialect needs a "
                    "llama.cpp server from 2025 or later (older ones return probabilities, not log-probabilities)")
            tokens.append(int(entry["id"]))
            lps.append(_lp(entry["logprob"]))
            top.append(([int(t["id"]) for t in entry["top_logprobs"]], [_lp(t["logprob"]) for t in entry["top_logprobs"]]))
        timings = data.get("timings") or {}
        evaluated = timings.get("prompt_n")
        return [Completion(tokens, lps, top, int(evaluated) if evaluated is not None else None)]


class _VLLM(_Dialect):
    """The OpenAI completions dialect of vLLM (and SGLang): ``n`` completions per request."""

    name, endpoint = "vllm", "/v1/completions"

    def payload(self, prompt, n_predict, top_n, n, temperature, top_p, seed):
        body = {
            "model": self.model, "prompt": prompt, "max_tokens": n_predict, "logprobs": top_n, "n": n,
            "temperature": temperature, "top_p": top_p, "return_tokens_as_token_ids": True,
            "return_token_ids": True, "skip_special_tokens": False, "stream": False,
        }
        if seed is not None:
            body["seed"] = seed
        return body

    def parse(self, data):
        choices = sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))
        if not choices:
            raise RemoteEngineError("the engine's /v1/completions answer has no choices")
        usage = data.get("usage") or {}
        cached = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0
        evaluated = usage["prompt_tokens"] - cached if "prompt_tokens" in usage else None
        out = []
        for c in choices:
            lp = c.get("logprobs")
            if not lp or lp.get("top_logprobs") is None:
                raise RemoteEngineError("the engine returned no logprobs; it must support the OpenAI `logprobs` field")
            tokens = [_token_id(t) for t in lp["tokens"]]
            if c.get("token_ids") is not None and list(c["token_ids"])[: len(tokens)] != tokens:
                raise RemoteEngineError("the engine's token_ids disagree with its logprobs tokens")
            top = []
            for entry in lp["top_logprobs"]:
                pairs = sorted(((_token_id(k), _lp(v)) for k, v in (entry or {}).items()), key=lambda x: -x[1])
                top.append(([p[0] for p in pairs], [p[1] for p in pairs]))
            out.append(Completion(tokens, [_lp(x) for x in lp["token_logprobs"]], top, evaluated))
            evaluated = 0  # the prompt is computed once for all n choices
        return out


def _lp(x: Any) -> float:
    x = float("-inf") if x is None else float(x)
    return float("-inf") if x <= _NEG else x


def _token_id(token: str | int) -> int:
    if isinstance(token, int):
        return token
    if isinstance(token, str) and token.startswith("token_id:"):
        return int(token[len("token_id:"):])
    raise RemoteEngineError(
        f"the engine returned the token {token!r} as text, not as an id; it must support "
        "return_tokens_as_token_ids (vLLM >= 0.6); dealign never re-tokenises text")


# the backend ---------------------------------------------------------------------------------------
@dataclass
class _RowResult:
    tokens: list[int]  # forced then generated (up to and including an end-of-sequence token)
    logprobs: list[float]
    positions: list[tuple[list[int], list[float]]]  # sparse next distribution after each fed token
    finished: bool


@dataclass
class _RolloutState:
    base_ids: list[list[int]]
    rows: list[_RowResult] = field(default_factory=list)


class RemoteBackend(Backend):
    """Drives a serving engine at ``url`` speaking ``dialect`` (``"llamacpp"`` or ``"vllm"``).

    ``tokenizer`` must be the engine's model's tokenizer (the chat template is applied with it and
    answers are decoded with it).  ``top_n`` is how many log-probabilities each position returns: it
    must be at least the search's ``topk`` (and ``beam`` for beam search).  ``concurrency`` bounds
    the requests in flight; give the engine as many parallel slots (llama.cpp ``-np``).  Several
    searches may share it from their own threads (``with_own_counters`` each): the engine batches
    their requests.
    """

    thread_safe = True

    def __init__(self, url: str, tokenizer: Any, *, dialect: str = "llamacpp", model: str | None = None,
                 top_n: int = 20, concurrency: int = 16, timeout: float = 300.0, eos_ids: Sequence[int] | None = None,
                 check: bool = True, name: str | None = None) -> None:
        import httpx

        if dialect not in DIALECTS:
            raise ValueError(f"dialect must be one of {', '.join(DIALECTS)}; got {dialect!r}")
        if not isinstance(top_n, int) or top_n < 1:
            raise ValueError(f"top_n must be an integer >= 1; got {top_n!r}")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"the engine URL must start with http:// or https://; got {url!r}")
        self.url = url.rstrip("/")
        for suffix in ("/v1/completions", "/completion", "/v1"):
            if self.url.endswith(suffix):
                self.url = self.url[: -len(suffix)]
                break
        self.tokenizer = tokenizer
        self.name = name or self.url
        self.top_n = top_n
        self.counters = RemoteCounters()
        self._lock = threading.Lock()
        self._http = httpx.Client(timeout=httpx.Timeout(timeout, connect=10.0),
                                  limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency))
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="dealign-remote")
        self.dialect = _LlamaCpp(model) if dialect == "llamacpp" else _VLLM(model)
        self.vocab_size = max(len(tokenizer), int(getattr(tokenizer, "vocab_size", 0) or 0))
        ids = set(eos_ids) if eos_ids is not None else eos_ids_of(getattr(tokenizer, "eos_token_id", None))
        if not ids:
            raise ValueError("the tokenizer names no end-of-sequence token; pass eos_ids=[...]")
        self.eos_ids = frozenset(ids)
        self._pad = min(self.eos_ids)
        if check:
            try:
                self.check()
            except BaseException:
                self.close()
                raise

    # engine access ---------------------------------------------------------------------------------
    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._http.close()

    def _post(self, path: str, body: dict) -> dict:
        import httpx

        try:
            resp = self._http.post(self.url + path, json=body)
        except httpx.TimeoutException as exc:
            raise RemoteEngineError(f"the engine at {self.url} did not answer {path} in time ({exc!r}); "
                                    "raise the timeout or give the engine more parallel slots") from None
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        if resp.status_code >= 400:
            raise RemoteEngineError(self._refusal(path, resp))
        try:
            return resp.json()
        except ValueError:
            raise RemoteEngineError(f"the engine at {self.url} answered {path} with something that is not JSON: "
                                    f"{resp.text[:200]!r}") from None

    def _unreachable(self, exc: Exception) -> RemoteEngineError:
        return RemoteEngineError(f"cannot reach the engine at {self.url} ({type(exc).__name__}: {exc}); "
                                 "is it running, and is --engine-url right?")

    def _refusal(self, path: str, resp: Any) -> str:
        try:
            err = resp.json()
            msg = err.get("error", err) if isinstance(err, dict) else err
            msg = msg.get("message", msg) if isinstance(msg, dict) else msg
        except ValueError:
            msg = resp.text[:300]
        msg = str(msg)
        hint = ""
        low = msg.lower()
        if "logprob" in low and ("max" in low or "greater" in low):
            hint = (f" The engine caps log-probabilities below the {self.top_n} dealign asks for: restart vLLM with "
                    f"--max-logprobs {self.top_n} (or more), or lower top_n / --engine-top-n (it must stay >= topk).")
        elif "model" in low and ("not exist" in low or "not found" in low):
            hint = " Give the served model's name with --engine-model (see GET /v1/models)."
        elif resp.status_code == 404:
            hint = (f" The endpoint {path} does not exist there: is --engine-dialect right "
                    f"('llamacpp' uses /completion, 'vllm' uses /v1/completions)?")
        return f"the engine at {self.url} refused {path} (HTTP {resp.status_code}): {msg}.{hint}"

    def _complete(self, prompts: list[list[int]], n_predict: int, temperature: float, top_p: float,
                  seeds: list[int | None]) -> list[Completion]:
        """One completion per prompt, requests in flight together.  Identical greedy prompts are sent
        once; identical sampled prompts go as one request with ``n`` where the dialect has ``n``."""
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(prompts):
            key = tuple(p) if temperature <= 0 or self.dialect.name == "vllm" else (i,)
            groups.setdefault(key, []).append(i)
        jobs = []
        for members in groups.values():
            n = len(members) if temperature > 0 else 1
            body = self.dialect.payload(prompts[members[0]], n_predict, self.top_n, n, temperature, top_p,
                                        seeds[members[0]] if temperature > 0 else None)
            jobs.append((members, body))
        answers = list(self._pool.map(lambda job: self.dialect.parse(self._post(self.dialect.endpoint, job[1])), jobs))
        out: list[Completion | None] = [None] * len(prompts)
        evaluated = 0
        for (members, _), comps in zip(jobs, answers):
            for k, i in enumerate(members):
                out[i] = comps[k] if temperature > 0 else comps[0]
            evaluated += sum(c.prompt_evaluated or 0 for c in comps)
        with self._lock:
            c = self.counters
            c.requests += len(jobs)
            c.round_trips += 1
            # a prompt pass then one decode step per further token; the rows run batched on the engine
            c.forward_passes += max(len(o.tokens) for o in out)
            c.tokens_processed += evaluated + sum(len(o.tokens) for o in out) - len(out)
            c.rows_max = max(c.rows_max, len(prompts))
        for o in out:
            self._check_ids(o)
        return out  # type: ignore[return-value]

    def _check_ids(self, comp: Completion) -> None:
        if len(comp.top) != len(comp.tokens):
            raise RemoteEngineError("the engine returned a different number of tokens and log-prob positions")
        for ids, _ in comp.top:
            if ids and len(ids) < min(self.top_n, self.vocab_size):
                raise RemoteEngineError(
                    f"the engine returned {len(ids)} log-probabilities per position, fewer than the {self.top_n} asked "
                    f"for; raise its limit (vLLM --max-logprobs, llama.cpp n_probs) or lower top_n (keep it >= topk)")
            if ids and max(ids) >= self.vocab_size:
                raise RemoteEngineError(
                    f"the engine returned token id {max(ids)}, outside the tokenizer's vocabulary ({self.vocab_size}): "
                    "the tokenizer given is not the engine model's tokenizer")

    def check(self) -> None:
        """Fail early, with a clear message, when the engine is unreachable, lacks token-id prompts or
        log-probabilities, caps them below ``top_n``, or runs a model with a different tokenizer."""
        import httpx

        if self.dialect.name == "vllm" and self.dialect.model is None:
            try:
                models = self._http.get(self.url + "/v1/models").json()["data"]
                self.dialect.model = models[0]["id"]
            except httpx.HTTPError as exc:
                raise self._unreachable(exc) from None
            except (ValueError, KeyError, IndexError, TypeError):
                raise RemoteEngineError(f"the engine at {self.url} lists no model at /v1/models; give the served model "
                                        "name with --engine-model") from None
        probe = self.tokenizer.encode("Hello, how are you?", add_special_tokens=False) or [self._pad]
        comp = self._complete([probe], 2, 0.0, 1.0, [None])[0]
        if not comp.top or not comp.top[0][0]:
            raise RemoteEngineError("the engine returned no top log-probabilities for a token-id prompt")
        self._check_tokenizer()

    def _check_tokenizer(self) -> None:
        """Compare the engine's tokenisation of a probe text with the local tokenizer's, where the
        engine offers ``/tokenize`` (a mismatch would silently decode garbage)."""
        import httpx

        text = "Decoding-time alignment keeps token ids exact: 12 dogs, 3 frisbees."
        local = self.tokenizer.encode(text, add_special_tokens=False)
        body = {"content": text, "add_special": False} if self.dialect.name == "llamacpp" else \
            {"model": self.dialect.model, "prompt": text, "add_special_tokens": False}
        try:
            resp = self._http.post(self.url + "/tokenize", json=body)
            remote = resp.json().get("tokens") if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            remote = None
        if remote is not None and [t["id"] if isinstance(t, dict) else t for t in remote] != local:
            raise RemoteEngineError(
                "the engine's model tokenises text differently from the local tokenizer; give the tokenizer of the "
                "model the engine serves (--engine-tokenizer / tokenizer=)")

    def check_search(self, cfg: Any) -> None:
        """The search proposes its actions from the top-n this engine returns: refuse a ``topk`` (or a
        beam search's ``beam``) larger than ``top_n`` instead of proposing tokens of unknown log-prob."""
        if cfg.strategy == "deal" and getattr(cfg, "fluency", 0):
            raise ValueError("fluency (the answer's log-prob in a neutral context, scored in the same forward as the "
                             "prompt) needs a local model; set fluency 0 (--fluency 0) with a remote engine")
        need = cfg.beam if cfg.strategy == "beam" else cfg.topk if cfg.strategy == "deal" else 1
        if need > self.top_n:
            what = "beam" if cfg.strategy == "beam" else "topk"
            raise ValueError(f"{what} {need} is more than the {self.top_n} log-probabilities asked of the engine per "
                             f"position; raise top_n (--engine-top-n {need}; vLLM also needs --max-logprobs {need}) "
                             f"or lower {what}")

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _dense(self, tops: list[tuple[list[int], list[float]]]) -> torch.Tensor:
        out = torch.full((len(tops), self.vocab_size), float("-inf"))
        for r, (ids, lps) in enumerate(tops):
            if ids:
                out[r, torch.tensor(ids)] = torch.tensor(lps, dtype=out.dtype)
        return out

    # Backend -------------------------------------------------------------------------------------
    def prefill(self, ids: Sequence[int]) -> Beam:
        if len(ids) == 0:
            raise ValueError("the prompt encodes to no tokens; give a non-empty prompt")
        comp = self._complete([list(ids)], 1, 0.0, 1.0, [None])[0]
        return Beam(ids=[list(ids)], next_logprobs=self._dense(comp.top[:1]), state=None)

    def rollout(self, beam: Beam, parents: Sequence[int], forced: torch.Tensor, steps: int, *,
                sampler: Sampler | None = None, feed_last: bool = False, follow: Sequence[int] | None = None) -> Rollout:
        if follow is not None:
            raise ValueError("a remote engine cannot tie rows together (follow); use a local model")
        sampler = sampler or Sampler()
        rows, n_forced = forced.shape
        if n_forced != 1:
            raise ValueError("a remote engine cannot score several forced tokens in one request; a draft (lookahead) "
                             "model is not supported with a remote policy")
        forced_l = forced.tolist()
        base = [beam.ids[p] for p in parents]
        first_lp = beam.next_logprobs[torch.as_tensor(list(parents))].gather(1, forced[:, :1]).squeeze(1).tolist()
        # generated tokens g1..g_m come with the distributions after forced, g1, ..., g_(m-1)
        n_predict = max(steps + (1 if feed_last else 0), 1)
        seeds: list[int | None] = [None] * rows
        if sampler.temperature > 0:
            seeds = torch.randint(0, 2**31 - 1, (rows,), generator=sampler.generator).tolist()
        todo = [r for r in range(rows) if forced_l[r][0] not in self.eos_ids]
        comps = self._complete([base[r] + forced_l[r] for r in todo], n_predict, sampler.temperature, sampler.top_p,
                               [seeds[r] for r in todo]) if todo else []
        by_row = dict(zip(todo, comps))
        width = n_forced + steps
        tokens = torch.full((rows, width), self._pad, dtype=torch.long)
        logprobs = torch.zeros(rows, width)
        length, finished, results = [], [], []
        for r in range(rows):
            toks, lps = list(forced_l[r]), [first_lp[r]]
            positions: list[tuple[list[int], list[float]]] = []
            done = toks[0] in self.eos_ids
            comp = by_row.get(r)
            if comp is not None:
                positions = list(comp.top)
                for tok, lp in zip(comp.tokens[:steps], comp.logprobs[:steps]):
                    toks.append(tok)
                    lps.append(lp)
                    if tok in self.eos_ids:
                        done = True
                        break
                if not done and len(toks) < width:
                    raise RemoteEngineError(
                        f"the engine stopped after {len(comp.tokens)} of {n_predict} tokens without an end-of-sequence "
                        f"token of this tokenizer ({sorted(self.eos_ids)}); the context may be full (llama.cpp -c) or "
                        "the engine's stop tokens differ from the tokenizer's")
            tokens[r, : len(toks)] = torch.tensor(toks)
            logprobs[r, : len(lps)] = torch.tensor(lps)
            length.append(len(toks))
            finished.append(done)
            results.append(_RowResult(toks, lps, positions, done))
        n_fed = n_forced + (steps if feed_last else max(steps - 1, 0))
        return Rollout(list(parents), tokens, logprobs, length, finished, n_fed, state=_RolloutState(base, results))

    def commit(self, rollout: Rollout, rows: Sequence[int], keep: int) -> Beam:
        st: _RolloutState = rollout.state
        if not 1 <= keep <= rollout.n_fed:
            raise ValueError(f"cannot keep {keep} tokens of a rollout that fed {rollout.n_fed}")
        tops = []
        for r in rows:
            pos = st.rows[r].positions
            if keep - 1 >= len(pos):
                raise ValueError(f"row {r} of the rollout ended before token {keep}; a finished row cannot be continued")
            tops.append(pos[keep - 1])
        ids = [st.base_ids[r] + rollout.tokens[r, :keep].tolist() for r in rows]
        return Beam(ids=ids, next_logprobs=self._dense(tops), state=None)
