"""Request bodies of the OpenAI endpoints and their translation into a search job.

Bodies are pydantic models in strict mode (``"max_tokens": "5"`` or ``true`` is an error, not a
coercion) that reject unknown fields.  The ``alignment`` object goes through the request settings the
command line and batch files use (``dealign.settings.Settings``): its fields are exactly the
``dealign generate`` options and batch JSONL fields (reward options, search settings, ``instruction``,
``response_prefix``), checked the same way, so the server, the CLI and batch files can never disagree
on what a field means.
"""

from __future__ import annotations

import difflib
from typing import Any, Dict, List, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..rewards.base import WeightedSum
from ..search import SearchConfig
from ..constraints import Constraint, ConstraintError, json_schema
from ..settings import INPUT_FIELDS, KNOWN_FIELDS, Settings
from .limits import ServerLimits, opening_states

# OpenAI request fields that map onto search settings; the alignment object must not repeat them
TOP_LEVEL = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed"}
ALIGNMENT_FIELDS = tuple(f for f in KNOWN_FIELDS if f not in INPUT_FIELDS and f not in TOP_LEVEL)
REGEX_FIELDS = ("must_match", "must_not_match")
# alignment fields of the CLI that a server must not take from a client
REFUSED = {"reward_model": "it loads a model from a path on the server; use named_rewards with a reward this server "
                           "offers (GET /health lists them)"}
# OpenAI parameters this server knows but does not implement: a clearer error than "unknown field"
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "audio", "modalities",
               "prediction", "reasoning_effort", "web_search_options", "top_logprobs")
MAX_STOP = 4


class ApiError(Exception):
    """An error answered in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str
    name: Optional[str] = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        """OpenAI content: a string, or a list of ``{"type": "text", "text": ...}`` parts (joined)."""
        if isinstance(value, list):
            texts = []
            for part in value:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ValueError(f'content parts must be {{"type": "text", "text": "..."}} (only text is supported); got {part!r:.80}')
                texts.append(part["text"])
            return "".join(texts)
        return value


class _Request(_Strict):
    """The fields /v1/completions and /v1/chat/completions share."""

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    stop: Optional[List[str]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[Dict[str, float]] = None
    user: Optional[str] = None
    metadata: Optional[Dict[str, str]] = None
    alignment: Optional[Dict[str, Any]] = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            if len(value) > MAX_STOP or not all(isinstance(s, str) and s for s in value):
                raise ValueError(f"stop must be a non-empty string or a list of at most {MAX_STOP} non-empty strings")
        return value

    def _unsupported(self) -> list[tuple[str, Any, str]]:
        """(field, value, why) for each OpenAI parameter set to something this server does not do."""
        out = []
        if self.n not in (None, 1):
            out.append(("n", self.n, "one choice per request (for best-of-n reranking use alignment.strategy 'best-of-n')"))
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                out.append((name, getattr(self, name), "penalties are not implemented (use alignment rewards)"))
        if self.logit_bias:
            out.append(("logit_bias", self.logit_bias, "logit_bias is not implemented (use alignment.banned)"))
        return out

    def check_supported(self) -> None:
        problems = self._unsupported()
        if problems:
            name, value, why = problems[0]
            raise ApiError(400, f"{name}={value!r} is not supported by this server: {why}", param=name, code="unsupported")


class CompletionRequest(_Request):
    prompt: str
    echo: Optional[bool] = None
    suffix: Optional[str] = None
    best_of: Optional[int] = None
    logprobs: Optional[int] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, list):
            if len(value) == 1 and isinstance(value[0], str):
                return value[0]
            if value and all(isinstance(v, int) for v in value) or value and all(isinstance(v, list) for v in value):
                raise ValueError("token-id prompts are not supported; send the prompt as text")
            raise ValueError(f"send one prompt per request (a string, or a list of one string); got a list of {len(value)}")
        return value

    def _unsupported(self):
        out = super()._unsupported()
        if self.echo:
            out.append(("echo", self.echo, "the prompt is not repeated in the answer"))
        if self.suffix:
            out.append(("suffix", self.suffix, "insertion (suffix) is not implemented"))
        if self.best_of not in (None, 1):
            out.append(("best_of", self.best_of, "use alignment.strategy 'best-of-n' with alignment.n"))
        if self.logprobs:
            out.append(("logprobs", self.logprobs, "log-probabilities are reported in alignment (logprob, score)"))
        return out

    def job_prompt(self) -> str:
        return self.prompt


class ChatCompletionRequest(_Request):
    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    response_format: Optional[Dict[str, Any]] = None

    def _unsupported(self):
        out = super()._unsupported()
        if self.logprobs:
            out.append(("logprobs", self.logprobs, "log-probabilities are reported in alignment (logprob, score)"))
        if self.max_tokens is not None and self.max_completion_tokens is not None and self.max_tokens != self.max_completion_tokens:
            out.append(("max_completion_tokens", self.max_completion_tokens, "give max_tokens or max_completion_tokens, not two different values"))
        return out

    def job_prompt(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in self.messages]


def _unknown_alignment(values: dict[str, Any]) -> str | None:
    for name in values:
        if name in REFUSED:
            return f"alignment.{name} is not accepted by the server: {REFUSED[name]}"
        if name in TOP_LEVEL:
            return f"alignment.{name}: set {TOP_LEVEL[name]} at the top level of the request instead"
        if name not in ALIGNMENT_FIELDS:
            close = difflib.get_close_matches(name, ALIGNMENT_FIELDS, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            return f"unknown alignment field {name!r}{hint}; known fields: {', '.join(ALIGNMENT_FIELDS)}"
    return None


def response_format(value: dict[str, Any] | None) -> Constraint | None:
    """OpenAI's ``response_format`` as a constraint: ``text`` (none), ``json_object`` (any JSON
    object) or ``json_schema`` (``{"json_schema": {"name": ..., "schema": {...}}}``).  400 otherwise."""
    if value is None:
        return None
    kind = value.get("type")
    try:
        if kind == "text":
            return None
        if kind == "json_object":
            return json_schema({"type": "object"})
        if kind == "json_schema":
            spec = value.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise ConstraintError('response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}')
            return json_schema(spec.get("schema", {}))
    except ConstraintError as exc:
        raise ApiError(400, f"response_format: {exc}", param="response_format") from None
    raise ApiError(400, f"response_format type must be text, json_object or json_schema, got {kind!r}",
                   param="response_format", code="unsupported")


def plan(request: _Request, limits: ServerLimits, *, default_max_tokens: int,
         defaults: dict[str, Any] | None = None
         ) -> tuple[SearchConfig, WeightedSum, dict, Settings | None, Constraint | None]:
    """The search settings, reward, prompt options and output constraint a request asks for, checked
    against the operator's limits: ``(config, reward, prompt_options, alignment settings or None,
    constraint or None)``.  Raises ``ApiError`` (400) naming the field and the limit."""
    request.check_supported()
    max_tokens = getattr(request, "max_completion_tokens", None) or request.max_tokens or default_max_tokens
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens={max_tokens} is more than this server allows ({limits.max_tokens}, set by "
                            "--max-tokens)", param="max_tokens", code="limit_exceeded")
    search: dict[str, Any] = {"max_new_tokens": max_tokens}
    for name in ("top_p", "seed"):
        if getattr(request, name) is not None:
            search[name] = getattr(request, name)
    settings = None
    if request.alignment is None:  # plain decoding, as an OpenAI server would
        search["strategy"] = "sample" if request.temperature else "greedy"
        if request.temperature:
            search["temperature"] = request.temperature
        reward, prompt = WeightedSum(), {}
    else:
        problem = _unknown_alignment(request.alignment)
        if problem:
            raise ApiError(400, problem, param="alignment", code="unknown_field")
        if not limits.allow_regex:
            used = [f for f in REGEX_FIELDS if request.alignment.get(f) is not None]
            if used:
                raise ApiError(400, f"alignment.{used[0]} is disabled on this server (started with --no-allow-regex)",
                               param=f"alignment.{used[0]}", code="disabled")
        try:
            settings = Settings.from_values(request.alignment)
            search = {**(defaults or {}), **search}  # the aligner's own defaults (fluency), under the request's
            _check_named_rewards(getattr(settings, "models", {}).get("named_rewards") or {}, limits)
            search.update(settings.search)
            if request.temperature is not None and search.get("strategy", SearchConfig.strategy) in ("sample", "best-of-n"):
                search["temperature"] = request.temperature
            reward = settings.build_reward()
        except ValueError as exc:  # UsageError, RewardError, ConstraintError, a bad regular expression
            raise ApiError(400, f"alignment: {exc}", param="alignment") from None
        prompt = dict(settings.prompt)
    fmt = response_format(getattr(request, "response_format", None))
    if settings is not None and settings.constraint:
        if fmt is not None:
            raise ApiError(400, f"give one output format: response_format or alignment.{next(iter(settings.constraint))}, "
                                "not both", param="response_format")
        fmt = settings.build_constraint()
    try:
        cfg = SearchConfig(**search)
    except ValueError as exc:  # ConfigError: a value out of range
        raise ApiError(400, f"invalid search settings: {exc}", param="alignment" if settings else None) from None
    width = limits.width(cfg)
    if width > limits.max_candidates:
        raise ApiError(400, f"the search is too wide: {_width_formula(cfg)}{width}, more than this server allows "
                            f"({limits.max_candidates}, set by --max-candidates); lower beam, topk, lookahead (open_topk, open_lookahead) or n",
                       param="alignment", code="limit_exceeded")
    return cfg, reward, prompt, settings, fmt


def _check_named_rewards(names: dict[str, float], limits: ServerLimits) -> None:
    """Only rewards of the registry that the operator offers: never a path on the server."""
    offered = limits.offered_rewards()
    for name in names:
        if name.strip().lower().replace("-", "_") not in offered:
            listed = ", ".join(offered) or "none (started with --rewards none)"
            raise ApiError(400, f"alignment.named_rewards: {name!r} is not a reward this server offers; it offers: "
                                f"{listed}", param="alignment.named_rewards", code="unknown_reward")


def _width_formula(cfg: SearchConfig) -> str:
    states = opening_states(cfg)
    if cfg.strategy == "deal" and states * cfg.open_topk * max(1, cfg.open_lookahead) > cfg.beam * cfg.topk * max(1, cfg.lookahead):
        return (f"{states} state{'s' if states > 1 else ''} x open_topk {cfg.open_topk} x open_lookahead "
                f"{max(1, cfg.open_lookahead)} = ")
    if cfg.strategy == "deal":
        return f"beam {cfg.beam} x topk {cfg.topk} x lookahead {max(1, cfg.lookahead)} = "
    if cfg.strategy == "beam":
        return f"beam {cfg.beam} x beam {cfg.beam} = "
    return "n = "


def describe_validation(errors: list[dict]) -> tuple[str, str | None]:
    """A pydantic/FastAPI validation failure as one readable sentence and the first field named."""
    messages, first = [], None
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        name = ".".join(loc)
        first = first or (name or None)
        kind = err.get("type", "")
        if kind == "json_invalid":
            msg = f"the request body is not valid JSON ({err.get('ctx', {}).get('error', err.get('msg'))})"
        elif not loc:
            msg = ("the request body is missing; send a JSON object" if kind == "missing"
                   else "the request body must be a JSON object (Content-Type: application/json)")
        elif kind == "extra_forbidden":
            if loc[-1] in UNSUPPORTED:
                msg = f"{name!r} is not supported by this server"
            else:
                msg = f"unknown field {name!r}"
        elif kind == "missing":
            msg = f"{name}: this field is required"
        else:
            detail = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
            msg = f"{name}: {detail}"
        if msg not in messages:
            messages.append(msg)
    extra = f" (and {len(messages) - 3} more)" if len(messages) > 3 else ""
    return "; ".join(messages[:3]) + extra, first
