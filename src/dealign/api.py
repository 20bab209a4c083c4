"""The public entry point: ``Aligner.from_pretrained(model).generate(prompt, reward=..., search=...)``."""

from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from .backends.base import Backend
from .backends.hf import HFBackend
from .backends.lockstep import Lockstep, check_batch_size
from .constraints import Constraint, from_fields
from .constraints.matcher import grammar_for
from .errors import ModelLoadError, UsageError
from .joint import Joiner, joining
from .models.loading import load
from .rewards.base import as_reward
from .search import SearchConfig, SearchResult, TraceRecorder, run_search
from .settings import Settings, check_instructions

Messages = Sequence[Mapping[str, str]]


@dataclass
class GenerationResult:
    """What the search produced and how: the answer, its reward breakdown, the final beam, the cost."""

    text: str
    token_ids: list[int]
    finished: bool
    reward: float
    rewards: dict[str, float]
    logprob: float
    score: float
    strategy: str
    stats: dict[str, Any]
    beam: list[dict[str, Any]] = field(default_factory=list)
    prompt_tokens: int = 0
    fluency: float = 0.0  # the answer's log-prob in the neutral context (0 when the search did not read it)
    trace: dict[str, Any] | None = None  # every search step, when asked (generate(trace=True); docs/trace.md)
    start: int = 0  # with several instructions: the index of the one the answer grew from

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Aligner:
    """A language model ready for decoding-time alignment: a ``Backend`` the search drives and the
    tokenizer that turns prompts into its start state.

    Build one with a factory: ``Aligner.from_pretrained(name_or_path)`` (a packaged model, a folder, a
    GGUF file), ``Aligner.from_model(model, tokenizer)`` (a ``transformers`` model you hold) or
    ``Aligner.from_remote(url)`` (a serving engine).  The constructor takes any ``Backend``.

    ``draft`` is an optional cheaper backend sharing the tokenizer that runs the lookahead rollouts
    (the paper's LLM2); the policy still proposes the actions and scores the committed tokens.
    ``search_defaults`` are the search settings this aligner uses where a call does not give them
    (``generate`` explains the order); the factories set the ones that suit their backend.
    """

    _joiner: Joiner | None = None  # set on a lock-step lane (``lane``): its rewards' batches join the batch's

    def __init__(self, backend: Backend, tokenizer: Any, *, draft: Backend | None = None,
                 search_defaults: Mapping[str, Any] | None = None) -> None:
        self.name = str(getattr(backend, "name", "model"))
        _check_decodes(tokenizer, self.name)
        if draft is not None:
            d_tok = getattr(draft, "tokenizer", tokenizer)
            probe = "Decoding-time alignment checks the tokenizers agree."
            if d_tok.encode(probe) != tokenizer.encode(probe) or len(d_tok) != len(tokenizer):
                raise ValueError(
                    "the lookahead (draft) model must share the policy's tokenizer; they encode text differently. "
                    "Pick a draft model from the same family."
                )
        self.backend, self.tokenizer, self.draft = backend, tokenizer, draft
        self.search_defaults: dict[str, Any] = dict(search_defaults or {})

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, *, draft: tuple[Any, Any] | None = None,
                   name: str = "model") -> "Aligner":
        """A ``transformers`` causal LM and its tokenizer (``draft``: an optional ``(model, tokenizer)``
        for the lookahead), with the local search defaults (the fluency term)."""
        draft_backend = HFBackend(*draft, name="draft") if draft is not None else None
        return cls(HFBackend(model, tokenizer, name=name), tokenizer, draft=draft_backend,
                   search_defaults=LOCAL_SEARCH_DEFAULTS)

    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        *,
        draft_model: str | None = None,
        dtype: str = "float32",
        device: str = "cpu",
    ) -> "Aligner":
        """Load ``model`` (default: packaged SmolLM2-135M-Instruct; or a folder, GGUF file, cached hub id)."""
        loaded = load(model, dtype=dtype, device=device)
        draft = None
        if draft_model is not None:
            d = load(draft_model, dtype=dtype, device=device)
            draft = (d.model, d.tokenizer)
        return cls.from_model(loaded.model, loaded.tokenizer, draft=draft, name=str(model or "smollm2"))

    @classmethod
    def from_remote(
        cls,
        url: str,
        *,
        dialect: str = "llamacpp",
        tokenizer: str | Any | None = None,
        model: str | None = None,
        top_n: int = 20,
        concurrency: int = 16,
        timeout: float = 300.0,
    ) -> "Aligner":
        """Drive the search on a serving engine at ``url`` (``dialect`` ``"llamacpp"`` or ``"vllm"``;
        SGLang speaks ``"vllm"``).  ``tokenizer`` is the served model's tokenizer: a tokenizer object,
        or a packaged name / folder / .gguf / cached hub id to load it from (default: the packaged
        SmolLM2); the chat template is applied here and only token ids travel.  ``model`` is the served
        model's name for the OpenAI dialect (default: the first of ``GET /v1/models``).  ``top_n``
        log-probabilities per position must cover the search's ``topk``.  See ``backends/remote.py``."""
        from .backends.remote import RemoteBackend  # httpx: only for a remote engine

        tok, eos = (tokenizer, None) if tokenizer is not None and not isinstance(tokenizer, str) else load_tokenizer(tokenizer)
        backend = RemoteBackend(url, tok, dialect=dialect, model=model, top_n=top_n, concurrency=concurrency,
                                timeout=timeout, eos_ids=eos, name=f"{dialect}@{url}")
        return cls(backend, tok, search_defaults=REMOTE_SEARCH_DEFAULTS)

    # prompts -------------------------------------------------------------------------------------
    def encode_prompt(
        self,
        prompt: str | Messages,
        *,
        instruction: str | None = None,
        response_prefix: str = "",
    ) -> tuple[list[int], str]:
        """Token ids of the start state and the user's text the rewards see.

        The chat template is applied when the tokenizer has one.  ``instruction`` is the paper's
        start-state adaptation: an alignment instruction given as the system message (or prepended
        to the prompt for a model without a chat template).  ``response_prefix`` pre-fills the start of
        the answer (e.g. a continuation attack); it counts as part of the prompt.
        """
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = [dict(m) for m in prompt]
            bad = [m for m in messages if "role" not in m or "content" not in m]
            if not messages or bad:
                raise ValueError("chat messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        user_text = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
        if not str(user_text).strip() and not response_prefix:
            raise ValueError("the prompt is empty; give some text to respond to")
        if instruction:
            if messages[0]["role"] == "system":
                messages[0]["content"] = f"{instruction}\n{messages[0]['content']}"
            else:
                messages.insert(0, {"role": "system", "content": instruction})
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer.encode(text + response_prefix, add_special_tokens=False)
        else:
            text = "\n\n".join(m["content"] for m in messages)
            ids = self.tokenizer.encode(text + ("\n" if response_prefix else "") + response_prefix)
        return ids, str(user_text)

    def encode_starts(self, prompt: str | Messages, *, instruction: str | Sequence[str | None] | None = None,
                      response_prefix: str = "") -> tuple[list[list[int]], str]:
        """``encode_prompt`` for each start state: one per instruction when ``instruction`` is a list
        (see ``generate``), else one."""
        encoded = [self.encode_prompt(prompt, instruction=i, response_prefix=response_prefix)
                   for i in _instructions(instruction)]
        return [ids for ids, _ in encoded], encoded[0][1]

    # generation ----------------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | Messages,
        *,
        reward: Any = None,
        search: SearchConfig | Mapping[str, Any] | None = None,
        instruction: str | Sequence[str | None] | None = None,
        response_prefix: str = "",
        on_commit: Callable[[list[int]], None] | None = None,
        profile: str | None = None,
        trace: bool | Callable[[dict], None] = False,
        constraint: Constraint | None = None,
        json_schema: Mapping[str, Any] | str | None = None,
        regex: str | None = None,
        grammar: str | None = None,
        choice: Sequence[str] | None = None,
        **overrides: Any,
    ) -> GenerationResult:
        """Decode ``prompt`` with ``search`` (a ``SearchConfig``, a dict of its fields, or keyword
        overrides such as ``strategy="greedy"``), maximising ``reward`` (a ``Reward``, a weighted sum
        of them, or any callable ``f(prompts, completions) -> list[float]``).

        Which settings win, lowest first: ``SearchConfig``'s defaults, this aligner's
        ``search_defaults``, ``search``, the keyword overrides.  A dict ``search`` names only some
        fields, so the aligner's defaults fill in the rest; a ``SearchConfig`` states every field, so
        it replaces both levels of defaults (build it as ``SearchConfig(**aligner.search_defaults, ...)``
        to keep them).

        ``on_commit(token_ids)`` is called after every search step with the answer's tokens that are
        already certain (a growing prefix; see ``run_search``); raising from it aborts the search.

        ``instruction``: the alignment instruction (the system message), or a list of them: start
        states DeAL searches together, the reward choosing between their answers (``None`` in the
        list: the request without one); ``result.start`` says which one the answer grew from.

        ``profile`` (see ``dealign.profiles``, e.g. ``"safe"``) supplies search settings beneath
        ``search`` and the overrides, and the reward and instruction when those are not given.

        ``trace=True`` records the search step by step into ``result.trace`` (the format of
        ``docs/trace.md``; the answer is the same either way); a callable is also called with each
        part of it as the search makes it (``{"type": "begin" | "step" | "end", ...}``).

        A hard format (at most one; ``dealign.constraints``): ``constraint`` (built with
        ``dealign.constraints.json_schema`` etc.), or ``json_schema`` (a dict or its JSON text),
        ``regex``, ``grammar`` (Lark or GBNF text) or ``choice`` (a list of strings).  Every token of
        every strategy is drawn from the masked distribution, so a finished answer always matches; one
        that cannot be completed within ``max_new_tokens`` comes back unfinished (``finished`` False,
        ``stats["constraint"]["complete"]`` False)."""
        fmt = from_fields(json_schema, regex, grammar, choice, constraint)
        if profile is not None:
            search, reward, instruction = _with_profile(profile, search, reward, instruction)
        cfg = _config(search, overrides, self.search_defaults)
        rsum = as_reward(reward)
        (ids, *starts), user_text = self.encode_starts(prompt, instruction=instruction, response_prefix=response_prefix)
        check = getattr(self.backend, "check_search", None)  # a remote engine: top_n must cover topk
        if check is not None:
            check(cfg)
        grammars = [grammar_for(b, fmt) for b in (self.backend, self.draft) if b is not None] if fmt else []
        fluency_ids = None
        if cfg.strategy == "deal" and cfg.fluency:
            fluency_ids, _ = self.encode_prompt(cfg.fluency_prompt, response_prefix=response_prefix)
        recorder = None
        if trace:
            recorder = TraceRecorder(self.backend.decode, prompt=prompt if isinstance(prompt, str) else [dict(m) for m in prompt],
                                     strategy=cfg.strategy, settings=cfg.to_dict(), rewards=dict(zip(rsum.names, (w for _, w in rsum.terms))),
                                     lam=0.0 if cfg.strategy == "beam" else cfg.lam,
                                     on_event=trace if callable(trace) else None)
        before = self.backend.counters.snapshot()
        mask_before = sum(g.mask_seconds for g in grammars)
        with joining(self._joiner):
            result = run_search(self.backend, ids, rsum, cfg, prompt_text=user_text, draft=self.draft,
                                on_commit=on_commit, fluency_ids=fluency_ids, trace=recorder, constraint=fmt,
                                starts=starts)
        out = _to_result(result, cfg, len(ids))
        if fmt is not None:
            out.stats["constraint"] = {
                "kind": fmt.kind, "complete": out.finished,
                "mask_seconds": round(sum(g.mask_seconds for g in grammars) - mask_before, 4),
                **({} if out.finished else {"note": f"the {fmt.describe()} constraint could not be completed within "
                                                    f"max_new_tokens={cfg.max_new_tokens}: the answer is cut short"}),
            }
        after = self.backend.counters.snapshot()
        for key in after.keys() - out.stats.keys():  # a remote engine's requests and round trips
            out.stats[key] = after[key] - before[key]
        return out


    # many prompts --------------------------------------------------------------------------------
    def generate_batch(self, prompts: Sequence[str | Messages], *, batch_size: int = 8, **kwargs: Any) -> list[GenerationResult]:
        """``generate`` for every prompt (same keyword arguments), up to ``batch_size`` searches at a
        time in lock-step: each step is one forward pass per lookahead token over the rows of every
        search, and a finished prompt's place goes to the next one.  Each answer is the one
        ``generate`` gives alone (same settings, seed and reward; up to float near-ties).  Raises the
        first prompt's error, in input order."""
        out = []
        for result, error in self.map_batched(lambda al, p: al.generate(p, **kwargs), prompts, batch_size=batch_size):
            if error is not None:
                raise error
            out.append(result)
        return out

    def map_batched(self, fn: Callable[["Aligner", Any], Any], items: Iterable[Any], *,
                    batch_size: int = 8) -> Iterator[tuple[Any, BaseException | None]]:
        """``(fn(aligner, item), None)`` or ``(None, error)`` for every item, in input order, each
        yielded as soon as it and all before it are done; up to ``batch_size`` calls run at a time,
        their searches batched step by step (``backends/lockstep.py``).  ``fn`` gets an aligner of
        its own sharing this one's model.  With ``batch_size`` 1 the items run one at a time here."""
        check_batch_size(batch_size)
        if batch_size == 1:
            for item in items:
                try:
                    yield fn(self, item), None
                except Exception as exc:  # noqa: BLE001 - handed back in order, as below
                    yield None, exc
            return
        lock = Lockstep(batch_size)
        yield from lock.map((lambda item=item: fn(self.lane(lock), item)) for item in items)

    def fork(self) -> "Aligner":
        """An aligner of its own on the same ``thread_safe`` backend (a remote engine), for one of
        several searches running at once in their own threads; its counters are its own."""
        al = copy.copy(self)
        al.backend = self.backend.with_own_counters()
        al.draft = self.draft.with_own_counters() if self.draft is not None else None
        return al

    def with_prefix_cache(self, mb: float) -> "Aligner":
        """This aligner on a backend that keeps ``mb`` MiB of recent prompts' caches (a server's: a
        prompt that opens like an earlier one reads only its rest); itself where the backend keeps
        none (a remote engine caches prefixes on its own)."""
        if not mb or not hasattr(self.backend, "with_prefix_cache"):
            return self
        al = copy.copy(self)
        al.backend = self.backend.with_prefix_cache(mb)
        return al

    def lane(self, lock: Lockstep) -> "Aligner":
        """An aligner of its own for one search of ``lock``'s batch: same model, tokenizer and
        defaults, its forward passes joining the batch's (its counters are its own)."""
        al = copy.copy(self)
        al.backend = lock.view(self.backend)
        al.draft = lock.view(self.draft) if self.draft is not None else None
        al._joiner = lock  # its model rewards' batches join the batch's too (dealign.joint)
        return al


# An engine's round trips dominate a remote search: segment mode sends one request per candidate per
# ``lookahead`` tokens (bench: 34 requests/prompt vs 159 in token mode, 2.65 vs 3.40 s/prompt)
# A local model reads every answer after a neutral request too (search/deal.py, "fluency"); the reward's
# weight rises with it so coverage holds (chosen on CommonGen dev rows 200-229: docs/fluency.md).
LOCAL_SEARCH_DEFAULTS = {"fluency": 1.0, "lam": 60.0}
# The fluency context rides in the policy's own forward passes (rows of one local batch): off remotely.
REMOTE_SEARCH_DEFAULTS = {"mode": "segment", "lookahead": 4, "fluency": 0.0}


def load_tokenizer(spec: str | None = None) -> tuple[Any, set[int] | None]:
    """The tokenizer of a packaged model name, folder, .gguf file or cached hub id, and the model's
    end-of-sequence ids (its generation config's, as the local backend uses), without loading weights."""
    from transformers import AutoTokenizer, GenerationConfig

    from .backends.base import eos_ids_of
    from .models.loading import resolve

    where = resolve(spec)
    kwargs = {"local_files_only": True} if not hasattr(where, "is_dir") else {}
    try:
        tok = AutoTokenizer.from_pretrained(str(where), **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load a tokenizer from {where!r} (a packaged model name, a folder with the "
                             f"tokenizer files, a .gguf file or a hub id in the local cache): {exc}") from exc
    try:
        gen = GenerationConfig.from_pretrained(str(where), **kwargs).eos_token_id
    except (OSError, ValueError):
        gen = None
    return tok, eos_ids_of(gen, tok.eos_token_id) or None


def _check_decodes(tokenizer: Any, name: str) -> None:
    """Rewards (keywords, well_formed, a reward model) read the answer as text: refuse a tokenizer that
    cannot turn ids back into text now, in one line, rather than deep inside a search."""
    probe = "A dog catches the frisbee."
    try:
        text = tokenizer.decode(tokenizer.encode(probe, add_special_tokens=False), skip_special_tokens=True)
    except Exception as exc:  # noqa: BLE001 - any failure here is the same user-facing problem
        raise ValueError(f"the tokenizer of {name!r} cannot decode token ids to text ({type(exc).__name__}: {exc}); "
                         "rewards read the answer as text: load the model with its own tokenizer") from None
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"the tokenizer of {name!r} decodes {probe!r} to {text!r}; rewards read the answer as text: "
                         "load the model with a tokenizer that decodes")


def _config(search: SearchConfig | Mapping[str, Any] | None, overrides: Mapping[str, Any],
            defaults: Mapping[str, Any]) -> SearchConfig:
    """The search settings of one call: defaults < search < overrides (see ``Aligner.generate``)."""
    if search is None or isinstance(search, Mapping):
        search = SearchConfig(**{**defaults, **_known(search or {})})
    elif not isinstance(search, SearchConfig):
        raise TypeError(f"search must be a SearchConfig or a dict of its fields, got {type(search).__name__}")
    return search.replace(**_known(overrides)) if overrides else search


def _instructions(instruction: str | Sequence[str | None] | None) -> list[str | None]:
    """One instruction, or several: start states DeAL searches together (``deal_search``'s ``starts``);
    ``None`` or "" in a list is the request without one."""
    if instruction is None or isinstance(instruction, str):
        return [instruction]
    return check_instructions(["" if i is None else i for i in instruction])  # "" and None: no instruction


def _with_profile(name: str, search: Any, reward: Any, instruction: Any) -> tuple[dict, Any, Any]:
    """A profile's settings beneath what the call gives: its search fields under ``search``, its
    reward and instruction only where the call gives none."""
    if isinstance(search, SearchConfig):
        raise UsageError("profile= sets search fields beneath yours: pass search as a dict of fields (or keyword "
                         "overrides), not a SearchConfig, which states every field")
    base = Settings.from_values({"profile": name})
    search = {**base.search, **_known(search or {})}
    reward = base.build_reward() if reward is None else reward
    return search, reward, instruction if instruction is not None else base.prompt.get("instruction")


def _known(values: Mapping[str, Any]) -> Mapping[str, Any]:
    """``values`` if every name is a search setting; else a one-line error naming the closest setting
    (a reward field such as ``named_rewards`` goes in ``reward=``, or comes with a ``profile``)."""
    known = {f.name for f in dataclasses.fields(SearchConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TypeError(f"unknown search setting{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; rewards go in "
                        f"reward= (e.g. dealign.rewards.named_reward), a profile with profile=; known settings: "
                        f"{', '.join(sorted(known))}")
    return values


def _to_result(result: SearchResult, cfg: SearchConfig, prompt_tokens: int) -> GenerationResult:
    best = result.best
    return GenerationResult(
        text=best.text,
        token_ids=list(best.token_ids),
        finished=best.finished,
        reward=best.reward,
        rewards=dict(best.rewards),
        logprob=best.logprob,
        score=best.score,
        strategy=cfg.strategy,
        stats=dataclasses.asdict(result.stats),
        beam=[
            {"text": h.text, "score": h.score, "logprob": h.logprob, "fluency": h.fluency, "reward": h.reward,
             "finished": h.finished}
            for h in result.beam
        ],
        prompt_tokens=prompt_tokens,
        fluency=best.fluency,
        trace=result.trace,
        start=best.start,
    )
