"""Request settings: the fields a ``dealign generate`` flag, a batch JSONL line and a server request's
``alignment`` object may set, sorted into search / reward / prompt groups and type-checked.

One module for all three callers, so a batch line behaves exactly like the equivalent command line and
the server can never disagree with either on what a field means.  Search defaults are never restated
here: unset values are simply not passed, so ``SearchConfig``'s own defaults (and the aligner's
``search_defaults``) apply.  Adding a search field to ``SearchConfig`` adds it here by itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from .constraints import KINDS, Constraint, from_fields
from .errors import UsageError
from .profiles import get_profile, overridden
from .rewards import from_options, keyword_coverage, keywords_found, normalize_keywords
from .rewards.base import WeightedSum
from .search import SearchConfig

SEARCH_FIELDS = tuple(f.name for f in dataclasses.fields(SearchConfig))
REWARD_FIELDS = tuple(inspect.signature(from_options).parameters)
# --reward NAME=W, --reward-model PATH, and when the search calls them (costly models: every n tokens / finished only)
MODEL_REWARD_FIELDS = ("named_rewards", "reward_model", "reward_every_n_tokens", "reward_finished_only")
PROMPT_FIELDS = ("instruction", "response_prefix")
# a hard format the answer must match (dealign.constraints): at most one of them
CONSTRAINT_FIELDS = KINDS
INPUT_FIELDS = ("prompt", "messages")
# a named set of the fields above (profiles.py), applied beneath the fields given beside it
PROFILE_FIELDS = ("profile",)
# what the answer carries besides its text: the search's trace (docs/trace.md); never changes the answer
OUTPUT_FIELDS = ("trace",)
SETTING_FIELDS = (SEARCH_FIELDS + REWARD_FIELDS + MODEL_REWARD_FIELDS + PROMPT_FIELDS + CONSTRAINT_FIELDS
                  + PROFILE_FIELDS + OUTPUT_FIELDS)  # all but the input
KNOWN_FIELDS = SETTING_FIELDS + INPUT_FIELDS

_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def check_search_value(name: str, value: Any) -> Any:
    """Type-check one search setting against the type of its SearchConfig default (JSON lines can
    carry anything; SearchConfig checks ranges but would crash on e.g. ``"lam": "high"``)."""
    kind = type(getattr(SearchConfig(), name))
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind in (int, float):
        ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
        value = float(value) if ok and kind is float else value
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise UsageError(f"{name} must be {_TYPE_NAMES.get(kind, kind.__name__)}, got {value!r}")
    return value


def check_instructions(value: list) -> list[str]:
    """Several instructions (start states DeAL searches together): a non-empty list of strings, "" for
    the request without one; the one check for Python, batch lines and the server."""
    if not value or not all(isinstance(v, str) for v in value):
        raise UsageError(f"instruction must be a string or a non-empty list of strings (start states DeAL searches "
                         f"together), got {value!r}")
    return list(value)


def _check_strings(name: str, value: Any) -> None:
    if isinstance(value, str):
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{name} must be a string or a list of strings, got {value!r}")


def _check_weights(value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping) or not all(
        isinstance(w, (int, float)) and not isinstance(w, bool) for w in value.values()
    ):
        raise UsageError(f'weights must be an object of reward name -> number, e.g. {{"keywords": 0.7}}; got {value!r}')
    return {str(k): float(w) for k, w in value.items()}


def parse_weights(items: list[str] | None, flag: str = "--weight", example: str = "keywords=0.7",
                  default: float | None = None) -> dict[str, float] | None:
    """``["keywords=0.7", "max_words=0.3"]`` -> ``{"keywords": 0.7, "max_words": 0.3}``.  With a
    ``default`` weight, a bare ``NAME`` is allowed too.  The weight follows the *last* ``=``, so a
    path containing ``=`` still works."""
    if not items:
        return None
    out = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        if not sep and default is not None:
            name, value = item, str(default)
        name = name.strip()
        try:
            weight = float(value) if name else None
        except ValueError:
            weight = None
        if weight is None:
            hint = " or NAME" if default is not None else ""
            raise UsageError(f"{flag} takes NAME=NUMBER{hint} (e.g. {example}), got {item!r}")
        out[name] = weight
    return out


def parse_strategy_settings(items: list[str] | None) -> dict[str, dict]:
    """``["deal.lookahead=2", "best-of-n.n=16"]`` -> ``{"deal": {"lookahead": 2}, "best-of-n": {"n": 16}}``:
    ``dealign eval --set``, search settings per strategy label (the label is everything before the last
    dot of the name, so ``"deal w=.75/.25.lam=5"`` works too); values are type-checked like the batch fields."""
    out: dict[str, dict] = {}
    for item in items or []:
        name, sep, raw = item.rpartition("=")
        label, dot, field_ = name.rpartition(".")
        if not sep or not dot or not label.strip():
            raise UsageError(f"--set takes STRATEGY.SETTING=VALUE (e.g. deal.lookahead=2), got {item!r}")
        label, field_ = label.strip(), field_.strip()
        if field_ not in SEARCH_FIELDS:
            raise UsageError(f"--set {item!r}: {field_!r} is not a search setting; settable: {', '.join(SEARCH_FIELDS)}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw.strip()
        out.setdefault(label, {})[field_] = check_search_value(field_, value)
    return out


def _check_named_rewards(value: Any) -> dict[str, float]:
    """JSONL ``named_rewards``: an object name -> weight, or a list of ``"NAME=W"`` / ``"NAME"`` strings."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return parse_weights(value, "named_rewards", "harmless=0.75", default=1.0) or {}
    if not isinstance(value, Mapping) or not all(
        isinstance(w, (int, float)) and not isinstance(w, bool) for w in value.values()
    ):
        raise UsageError(
            f'named_rewards must be an object of reward name -> weight, e.g. {{"harmless": 0.75, "helpful": 0.25}}; got {value!r}'
        )
    return {str(k): float(w) for k, w in value.items()}


@dataclass
class Settings:
    """Everything but the prompt: search overrides, reward options and prompt options, each holding
    only the values that were given (``None`` means "use the default")."""

    search: dict[str, Any] = field(default_factory=dict)
    reward: dict[str, Any] = field(default_factory=dict)
    prompt: dict[str, Any] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)  # named_rewards, reward_model
    profile: str | None = None  # the profile these settings started from, if any
    notes: list[str] = field(default_factory=list)  # fields given beside the profile that override it
    output: dict[str, Any] = field(default_factory=dict)  # trace
    constraint: dict[str, Any] = field(default_factory=dict)  # json_schema / regex / grammar / choice, as given

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> "Settings":
        """Sort known fields into their groups, type-checking them; unknown keys are ignored here.
        A ``profile`` is applied first and the other fields over it (``weights`` and ``named_rewards``
        name by name), so every field given beside a profile wins; ``notes`` says which ones did."""
        if values.get("profile") is not None:
            profile = get_profile(values["profile"])
            rest = {k: v for k, v in values.items() if k != "profile" and v is not None}  # None: not given
            out = cls.from_values(profile.values).merged(rest)
            out.profile, out.notes = profile.name, overridden(profile, rest)
            return out
        s = cls()
        for name, value in values.items():
            if value is None:
                continue
            if name in SEARCH_FIELDS:
                s.search[name] = check_search_value(name, value)
            elif name in REWARD_FIELDS:
                if name in ("keywords", "banned", "must_match", "must_not_match"):
                    _check_strings(name, value)
                elif name == "weights":
                    value = _check_weights(value)
                s.reward[name] = value
            elif name == "named_rewards":
                s.models[name] = _check_named_rewards(value)
            elif name == "reward_model":
                _check_strings(name, value)
                s.models[name] = [value] if isinstance(value, str) else list(value)
            elif name == "reward_every_n_tokens":
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise UsageError(f"reward_every_n_tokens must be an integer >= 1, got {value!r}")
                s.models[name] = value
            elif name == "reward_finished_only":
                if not isinstance(value, bool):
                    raise UsageError(f"reward_finished_only must be true or false, got {value!r}")
                s.models[name] = value
            elif name == "instruction" and isinstance(value, list):  # several start states, searched together
                s.prompt[name] = check_instructions(value)
            elif name in PROMPT_FIELDS:
                if not isinstance(value, str):
                    raise UsageError(f"{name} must be a string, got {value!r}")
                s.prompt[name] = value
            elif name == "trace":
                if not isinstance(value, bool):
                    raise UsageError(f"trace must be true or false (record the search step by step), got {value!r}")
                s.output[name] = value
            elif name in CONSTRAINT_FIELDS:
                s.constraint[name] = value
        s.build_constraint()  # a bad schema, regex or grammar fails here, before any model work
        return s

    def build_constraint(self) -> Constraint | None:
        """The answer's hard format (``dealign.constraints``), or None; one-line errors for bad ones."""
        return from_fields(**self.constraint)

    def merged(self, values: Mapping[str, Any]) -> "Settings":
        """These settings overridden by ``values`` (a batch line); a JSON ``null`` resets a field to
        its default, and ``weights`` and ``named_rewards`` are merged name by name.  A line's ``profile``
        counts as fields of that line: it overrides the flags' settings, and the line's other fields
        override it."""
        over = Settings.from_values(values)
        # a line's constraint replaces the flags' (they do not combine)
        out = Settings({**self.search, **over.search}, {**self.reward, **over.reward}, {**self.prompt, **over.prompt},
                       {**self.models, **over.models}, over.profile or self.profile, self.notes + over.notes,
                       {**self.output, **over.output}, dict(over.constraint or self.constraint))
        for group, name in ((self.reward, "weights"), (self.models, "named_rewards")):
            if name in group and name in values and values[name] is not None:
                target = out.reward if group is self.reward else out.models
                target[name] = {**group[name], **target[name]}
        for name, value in values.items():
            if value is None:
                for group in (out.search, out.reward, out.prompt, out.models, out.output, out.constraint):
                    group.pop(name, None)
        return out

    def config(self) -> SearchConfig:
        return SearchConfig(**self.search)

    def build_reward(self) -> WeightedSum:
        """The programmatic rewards plus the named / model rewards (models load on first use)."""
        from .rewards.registry import NAMED

        misplaced = sorted(set(self.reward.get("weights") or {}) & set(NAMED))
        if misplaced:
            raise UsageError(f"{misplaced[0]!r} is a named reward: give its weight with --reward {misplaced[0]}=W "
                             '(in JSONL: "named_rewards"), not --weight')
        try:
            total = from_options(**self.reward)
        except TypeError as exc:  # e.g. a non-string keyword: still the user's input
            raise UsageError(str(exc)) from None
        if self.models:
            from .rewards.registry import build

            named, folders = self.models.get("named_rewards"), self.models.get("reward_model")
            if not named and not folders:
                raise UsageError("reward_every_n_tokens / reward_finished_only schedule model rewards: "
                                 "add one with --reward NAME=W or --reward-model PATH")
            total = total + build(named, folders, every_n_tokens=self.models.get("reward_every_n_tokens", 1),
                                  finished_only=self.models.get("reward_finished_only", False))
        return total

    @property
    def keywords(self) -> list[str] | None:
        kw = self.reward.get("keywords")
        return normalize_keywords(kw) if kw is not None else None

    def coverage(self, text: str) -> float | None:
        kw = self.keywords
        return keyword_coverage(text, kw) if kw else None

    def missing(self, text: str) -> list[str]:
        kw = self.keywords or []
        return [w for w, ok in zip(kw, keywords_found(text, kw)) if not ok]


def unknown_field_hints(values: Mapping[str, Any]) -> list[str]:
    """Hints for keys that look like misspelt settings (``"beams"``); other unknown keys (ids,
    references) are legitimate pass-through data and get no hint."""
    hints = []
    for name in values:
        if name not in KNOWN_FIELDS:
            close = difflib.get_close_matches(name, KNOWN_FIELDS, n=1, cutoff=0.8)
            if close:
                hints.append(f"unknown field {name!r} is copied to the output but not used (did you mean {close[0]!r}?)")
    return hints
