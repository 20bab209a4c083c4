"""Frozen feature extractors ("backbones") that a trained reward head sits on; they run at search time
(every scored candidate is a row), and ``dealign train-reward`` computes its training rows with them.

Two kinds, both mapping (prompt, response) pairs to one feature row each:

* ``sentence``: a sentence-transformers model (default: the packaged all-MiniLM-L6-v2) embeds the
  prompt and the response separately; the row is ``[e_prompt, e_response, e_prompt * e_response,
  log(1 + words) / 5]``.  Cheap (6 small layers), but it reads the two texts apart.
* ``lm``: a causal LM (default: the packaged SmolLM2-135M-Instruct) reads the chat-templated prompt
  (its last ``prompt_tokens`` tokens) followed by the response (its first ``response_tokens`` tokens); the
  row is one hidden layer mean-pooled over the response tokens.  It reads the response *in the context*
  of the question, which is what makes it a better harmlessness signal, at the cost of an LM forward
  pass over every scored response.  A search step scores many candidates for one prompt, each extending a
  beam of the step before: the prompt is read once, each candidate continues from the longest prefix
  already read (its keys/values kept), and all of a step's candidates share one forward, so a step costs
  one forward over the new tokens only.

Both memoise rows by input, so a search that rescores the same candidate costs nothing extra.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..models.loading import ALIASES, PACKAGED, ModelLoadError, load
from .base import RewardError
from .cache import cached, memoised, right_padded
from .embedding import embedder

SENTENCE_DEFAULT = "minilm"  # the packaged all-MiniLM-L6-v2
LM_DEFAULT = "smollm2"  # the packaged SmolLM2-135M-Instruct
KINDS = ("sentence", "lm")
SHARE_FROM = 4  # responses to one prompt from which they are read incrementally (LMBackbone._incremental)
# what is kept of the responses read for a prompt, each with its KV cache (~46 kB per token for SmolLM2):
KEEP_PROMPTS = 2  # the most recent prompts (a server may interleave requests; a miss only costs a re-read)
KEEP_READS = 32  # per prompt: the last step's candidates (what the next step extends), then their sources


@dataclass
class _Read:
    """A response read after the prompt: its token ids, each layer's keys and values over prompt + ids
    (batch 1), and the pooled layer's state at each of its tokens."""

    ids: tuple[int, ...]
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: [1, heads, positions, head_dim] each
    hidden: torch.Tensor  # [len(ids), dim]


@dataclass
class _PromptState:
    n_head: int
    after_prompt: torch.Tensor
    root: _Read  # the prompt alone
    reads: list[_Read] = field(default_factory=list)


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def length_feature(responses: Sequence[str]) -> torch.Tensor:
    return torch.tensor([[math.log1p(len(r.split())) / 5.0] for r in responses])


class SentenceBackbone:
    """Sentence embeddings of prompt and response, their product and the response's log length."""

    kind = "sentence"

    def __init__(self, spec: str | None = None) -> None:
        self.spec = spec or SENTENCE_DEFAULT
        self.embedder = embedder(None if self.spec == SENTENCE_DEFAULT else self.spec)
        self.dim = self.embedder.dim
        self.in_features = 3 * self.dim + 1

    @property
    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind, "backbone": self.spec, "dim": self.dim}

    def rows(self, vectors: torch.Tensor, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Feature rows from the embeddings of ``prompts + responses`` (in that order)."""
        n = len(prompts)
        e_p, e_r = vectors[:n], vectors[n:]
        return torch.cat([e_p, e_r, e_p * e_r, length_feature(responses).to(e_r.dtype)], dim=1)

    def features(self, prompts: Sequence[str], responses: Sequence[str], progress: bool = False) -> torch.Tensor:
        vectors = self.embedder.encode(list(prompts) + list(responses), progress=progress)
        return self.rows(vectors, prompts, responses)


class LMBackbone:
    """Mean-pooled hidden states of a causal LM over the response tokens, read after the prompt.

    ``layer``: which entry of ``hidden_states`` (-1: the last, after the final norm).  Long texts are cut
    to the prompt's last ``prompt_tokens`` and the response's first ``response_tokens`` tokens, so one
    row costs at most their sum in positions.  Rows are computed ``batch_size`` at a time."""

    kind = "lm"

    def __init__(self, spec: str | None = None, *, layer: int = -1, prompt_tokens: int = 96,
                 response_tokens: int = 96, batch_size: int = 16, memo: int = 50_000, device: str = "cpu") -> None:
        self.spec = spec or LM_DEFAULT
        self.layer, self.prompt_tokens, self.response_tokens = int(layer), int(prompt_tokens), int(response_tokens)
        if self.prompt_tokens < 1 or self.response_tokens < 1:
            raise RewardError("prompt_tokens and response_tokens must be >= 1")
        try:
            loaded = cached("causal_lm", f"{self.spec}|{device}", lambda: load(self.spec, device=device))
        except ModelLoadError as exc:
            raise RewardError(f"reward backbone: {exc}") from exc
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        n_layers = int(self.model.config.num_hidden_layers)
        if not -(n_layers + 1) <= self.layer <= n_layers:
            raise RewardError(f"layer {self.layer} is out of range for {self.spec} ({n_layers} layers: use 0..{n_layers} or -1)")
        self.dim = self.in_features = int(self.model.config.hidden_size)
        self.batch_size = batch_size
        self.device = next(self.model.parameters()).device
        self.memo: dict[tuple[str, str], torch.Tensor] = {}
        self.memo_size = memo
        self._lock = threading.Lock()
        self._states: dict[str, _PromptState] = {}  # insertion order = least recently used first
        self.incremental = True  # False: every row read from scratch (the reference the benchmark compares)
        self._plain_cache: bool | None = None

    def reset(self, *, incremental: bool = True) -> None:
        """Forget every row and prompt read so far (the memo and the kept caches), and read from now on
        incrementally (default) or every row from scratch: what a timing run does between its settings."""
        with self._lock:
            self.memo.clear()
            self._states.clear()
            self.incremental = incremental

    @property
    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind, "backbone": self.spec, "dim": self.dim, "layer": self.layer,
                "prompt_tokens": self.prompt_tokens, "response_tokens": self.response_tokens}

    def _prompt_ids(self, prompt: str) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        else:
            text = prompt + "\n"
        return tok.encode(text, add_special_tokens=False)[-self.prompt_tokens:]

    def _response_ids(self, response: str) -> list[int]:
        return self.tokenizer.encode(response, add_special_tokens=False)[: self.response_tokens]

    def _encode(self, prompt: str, response: str) -> tuple[list[int], int]:
        head = self._prompt_ids(prompt)
        return head + self._response_ids(response), len(head)

    @staticmethod
    def _pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over the positions where ``mask`` is 1: [rows, width, dim] -> [rows, dim]."""
        m = mask[:, :, None].to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)

    def _padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return right_padded(rows, self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)

    def _hidden(self, ids: torch.Tensor, mask: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, Any]:
        kw = {"cache": cache, "use_cache": True} if cache is not None else {}
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         output_hidden_states=True, **kw)
        return out.hidden_states[self.layer].float().cpu(), getattr(out, "cache", None) or cache

    def _whole(self, pairs: list[tuple[str, str]]) -> list[torch.Tensor]:
        """Prompt and response in one forward per row (rows of many prompts, each seen once or twice)."""
        encoded = [self._encode(p, r) for p, r in pairs]
        ids, mask = self._padded([e[0] for e in encoded])
        hidden, _ = self._hidden(ids, mask)
        body = mask.clone()
        for j, (row, n_head) in enumerate(encoded):
            if len(row) > n_head:
                body[j, :n_head] = 0
            else:  # an empty response has no tokens to pool: the state after the prompt stands in
                body[j, :] = 0
                body[j, len(row) - 1] = 1
        return list(self._pool(hidden, body))

    def _prompt_state(self, prompt: str) -> "_PromptState":
        """The prompt read once (its cache, the state after it), kept for the most recent prompts."""
        from transformers import DynamicCache

        st = self._states.pop(prompt, None)
        if st is None:
            head = self._prompt_ids(prompt)
            ids = torch.tensor([head], dtype=torch.long)
            hidden, cache = self._hidden(ids, torch.ones_like(ids), DynamicCache(config=self.model.config))
            kv = [(layer.keys, layer.values) for layer in cache.layers]
            st = _PromptState(len(head), hidden[0, -1], _Read((), kv, hidden[0, :0]))
        self._states[prompt] = st
        while len(self._states) > KEEP_PROMPTS:
            self._states.pop(next(iter(self._states)))
        return st

    def _incremental(self, prompt: str, responses: list[str]) -> list[torch.Tensor]:
        """A search step's candidates for one prompt.  The prompt is read once; each response continues
        from the longest token prefix already read for this prompt (the beam it extends, kept from the
        previous step with its keys/values and per-token states), so a step costs only the new tokens, and
        all of a step's candidates go through one forward (``batch_size`` rows at a time)."""
        st = self._prompt_state(prompt)
        bodies = [tuple(self._response_ids(r)) for r in responses]
        out: list[torch.Tensor | None] = [None] * len(responses)
        todo: list[tuple[int, _Read, int]] = []  # (response, the read it extends, tokens of it kept)
        sources: dict[int, _Read] = {}
        kept: list[_Read] = []
        for i, body in enumerate(bodies):
            if not body:  # an empty response has no tokens to pool: the state after the prompt stands in
                out[i] = st.after_prompt
                continue
            best, k = st.root, 0
            for read in st.reads:
                c = _common_prefix(read.ids, body)
                if c > k:
                    best, k = read, c
            if k == len(body):  # read already (the same text, or a prefix of a longer one)
                out[i] = best.hidden[:k].mean(0)
                kept.append(best)
                continue
            sources[id(best)] = best
            todo.append((i, best, k))
        todo.sort(key=lambda row: row[2])  # similar pasts share a forward: little padding
        fresh: list[_Read] = []
        for s in range(0, len(todo), self.batch_size):
            fresh += self._continue(st, todo[s : s + self.batch_size], bodies, out)
        kept += list(sources.values())
        if fresh or kept:  # what the next step extends: this step's texts and the prefixes they came from
            st.reads = list({id(r): r for r in kept + fresh if r is not st.root}.values())[-KEEP_READS:]
        return out  # type: ignore[return-value]

    def _has_plain_cache(self) -> bool:
        """Incremental reading needs a cache of plain keys and values per layer (not a recurrent state or a
        sliding window shorter than a prompt plus a response); other LMs read every row from scratch."""
        if self._plain_cache is None:
            from transformers import DynamicCache

            layers = getattr(DynamicCache(config=self.model.config), "layers", None)
            window = getattr(self.model.config, "sliding_window", None) or 0
            self._plain_cache = bool(layers) and all(hasattr(layer, "keys") and hasattr(layer, "values") for layer in layers) \
                and (not window or window >= self.prompt_tokens + self.response_tokens)
        return self._plain_cache

    def _continue(self, st: "_PromptState", rows: list[tuple[int, "_Read", int]], bodies: list[tuple[int, ...]],
                  out: list[torch.Tensor | None]) -> list["_Read"]:
        """One forward for ``rows`` = (response index, the read it extends, tokens of it kept): each row's
        past (prompt + kept tokens) is left-padded to the longest, its new tokens right-padded, and fed at
        its own positions.  Fills ``out`` and returns the new reads."""
        from transformers import DynamicCache

        past = [st.n_head + k for _, _, k in rows]
        width = max(past)
        new_ids, new_mask = self._padded([list(bodies[i][k:]) for i, _, k in rows])
        mask = torch.zeros((len(rows), width + new_ids.shape[1]), dtype=torch.long)
        for j, n in enumerate(past):
            mask[j, width - n : width] = 1
        mask[:, width:] = new_mask
        positions = torch.tensor(past)[:, None] + torch.arange(new_ids.shape[1])[None, :]
        cache = DynamicCache(config=self.model.config)
        for layer in range(len(rows[0][1].kv)):
            keys, values = [], []
            for (_, src, _), n in zip(rows, past):
                k_src, v_src = src.kv[layer]
                keys.append(torch.nn.functional.pad(k_src[:, :, :n], (0, 0, width - n, 0)))
                values.append(torch.nn.functional.pad(v_src[:, :, :n], (0, 0, width - n, 0)))
            cache.update(torch.cat(keys), torch.cat(values), layer)
        result = self.model(input_ids=new_ids.to(self.device), attention_mask=mask.to(self.device),
                            position_ids=positions.to(self.device), cache=cache, use_cache=True, output_hidden_states=True)
        hidden = result.hidden_states[self.layer].float().cpu()
        layers = (getattr(result, "cache", None) or cache).layers
        fresh = []
        for j, ((i, src, k), n) in enumerate(zip(rows, past)):
            n_new = int(new_mask[j].sum())
            states = torch.cat([src.hidden[:k], hidden[j, :n_new]])
            out[i] = states.mean(0)
            kv = [(lay.keys[j : j + 1, :, width - n : width + n_new], lay.values[j : j + 1, :, width - n : width + n_new])
                  for lay in layers]
            fresh.append(_Read(bodies[i], kv, states))
        return fresh

    def _compute(self, pairs: list[tuple[str, str]], progress: bool) -> list[torch.Tensor]:
        by_prompt: dict[str, list[int]] = {}
        for i, (p, _) in enumerate(pairs):
            by_prompt.setdefault(p, []).append(i)
        incremental = self.incremental and self._has_plain_cache()
        many = [(p, idx) for p, idx in by_prompt.items() if incremental and len(idx) >= SHARE_FROM]
        shared = {p for p, _ in many}
        few = sorted((i for p, idx in by_prompt.items() if p not in shared for i in idx),
                     key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))  # similar lengths: little padding
        batches = [(p, idx) for p, idx in many] + [(None, few[s : s + self.batch_size])
                                                   for s in range(0, len(few), self.batch_size)]
        out: list[torch.Tensor | None] = [None] * len(pairs)
        from tqdm import tqdm

        for prompt, idx in tqdm(batches, desc="features", unit="batch", disable=not progress, dynamic_ncols=True):
            with torch.inference_mode():
                got = (self._incremental(prompt, [pairs[i][1] for i in idx]) if prompt is not None
                       else self._whole([pairs[i] for i in idx]))
            for i, v in zip(idx, got):
                out[i] = v
        return out  # type: ignore[return-value]

    def features(self, prompts: Sequence[str], responses: Sequence[str], progress: bool = False) -> torch.Tensor:
        """Feature rows of (prompt, response) pairs; in a lock-step batch the rows still to compute join
        the other searches' (``dealign.joint``)."""
        keys = list(zip(prompts, responses))
        if not keys:
            return torch.zeros(0, self.dim)
        return torch.stack(memoised(self.memo, keys, lambda todo: self._locked_compute(todo, progress), self.memo_size,
                                    lock=self._lock, joint_key=("lm-features", id(self))))

    def _locked_compute(self, pairs: list[tuple[str, str]], progress: bool) -> list[torch.Tensor]:
        with self._lock:  # the server may score from several threads; one forward at a time
            return self._compute(pairs, progress)


def is_lm_spec(spec: str | None) -> bool:
    """Whether ``spec`` names a causal LM rather than a sentence-transformers model."""
    if spec is None or spec == SENTENCE_DEFAULT:
        return False
    key = spec.lower()
    if ALIASES.get(key, key) in PACKAGED:
        return True
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return True
    if path.is_dir():
        return not (path / "modules.json").is_file() and not (path / "config_sentence_transformers.json").is_file()
    raise RewardError(f"no backbone {spec!r}: give 'minilm', a packaged LM name ('smollm2', 'gemma3-270m'), "
                      "a sentence-transformers folder or a causal LM folder")


def backbone_of(spec: str | None, settings: dict[str, Any] | None = None) -> SentenceBackbone | LMBackbone:
    """The shared backbone for ``spec`` (``None``/"minilm": the packaged MiniLM); ``settings`` are an LM
    backbone's ``layer`` / ``prompt_tokens`` / ``response_tokens`` (as saved in a reward folder)."""
    settings = dict(settings or {})
    kind = settings.pop("kind", None) or ("lm" if is_lm_spec(spec) else "sentence")
    if kind not in KINDS:
        raise RewardError(f"unknown backbone kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind == "sentence":
        return cached("backbone", f"sentence|{spec or SENTENCE_DEFAULT}", lambda: SentenceBackbone(spec))
    lm_kw = {k: settings[k] for k in ("layer", "prompt_tokens", "response_tokens") if k in settings}
    return cached("backbone", f"lm|{spec}|{sorted(lm_kw.items())}", lambda: LMBackbone(spec, **lm_kw))
