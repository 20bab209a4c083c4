"""Hard output constraints: a JSON schema, a regex, a grammar or a fixed choice, applied as a mask on
the next-token distribution everywhere the search draws or scores a token.

``json_schema(schema)``, ``regex(pattern)``, ``grammar(text)`` and ``choice(options)`` build a
``Constraint`` (checked at once: a bad schema, regex or grammar is a one-line ``ConstraintError``
before any model work); ``Aligner.generate(prompt, constraint=...)`` (or ``json_schema=...`` etc.)
runs any strategy under it.  The grammar engine is llguidance (``matcher.py``); its matchers are
forked and committed with the search's rows, like the KV cache.  See docs/constraints.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import UsageError

KINDS = ("json_schema", "regex", "grammar", "choice")
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ConstraintError(UsageError):
    """A constraint that cannot be used: a bad schema, regex or grammar, an empty choice list, or one
    the tokenizer cannot start.  One line naming the problem."""


@dataclass(frozen=True)
class Constraint:
    """What the answer must match.  ``kind`` is one of ``KINDS``; ``source`` the schema (a dict), the
    pattern, the grammar text (Lark or GBNF) or the tuple of choices.  ``grammar_text`` is the
    llguidance grammar it compiles to (validated when built)."""

    kind: str
    source: Any
    grammar_text: str

    def describe(self) -> str:
        if self.kind == "choice":
            return f"choice of {len(self.source)}"
        return self.kind.replace("_", " ")


def _validated(kind: str, source: Any, text: str) -> Constraint:
    from llguidance import LLMatcher

    error = LLMatcher.validate_grammar(text)
    if error:
        first = " ".join(str(error).split())  # one line
        raise ConstraintError(f"invalid {kind.replace('_', ' ')}: {first[:300]}")
    return Constraint(kind, source, text)


def json_schema(schema: Mapping[str, Any] | str | bool) -> Constraint:
    """A JSON value valid under ``schema`` (a dict, or its JSON text).  ``{"type": "object"}``: any
    JSON object (the OpenAI ``json_object`` response format)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise ConstraintError(f"the JSON schema is not valid JSON: {exc}") from None
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, Mapping):
        raise ConstraintError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
    _check_schema(schema)
    from llguidance import LLMatcher

    try:
        # one canonical layout (json.dumps's ", " and ": ", no other whitespace): a model cannot spend its
        # budget on blank space between tokens
        text = LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_LAYOUT)
    except ValueError as exc:
        raise ConstraintError(f"invalid JSON schema: {exc}") from None
    return _validated("json_schema", dict(schema), text)


def _check_schema(schema: Mapping[str, Any]) -> None:
    """The schema against the JSON Schema meta-schema, when ``jsonschema`` is installed (llguidance
    then says what it cannot compile)."""
    try:
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError
    except ImportError:  # pragma: no cover - llguidance's own checks still run
        return
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise ConstraintError(f"invalid JSON schema at {where}: {exc.message}") from None


def regex(pattern: str) -> Constraint:
    """Text that matches ``pattern`` entirely (Rust ``regex`` syntax: no look-around, no backreferences)."""
    if not isinstance(pattern, str) or not pattern:
        raise ConstraintError(f"a regex constraint needs a non-empty pattern, got {pattern!r}")
    from llguidance import LLMatcher

    return _validated("regex", pattern, LLMatcher.grammar_from_regex(pattern))


def grammar(text: str) -> Constraint:
    """Text in the language of a Lark grammar (llguidance's dialect, ``start:`` rule) or a GBNF
    grammar (llama.cpp's, ``root ::=`` rule)."""
    if not isinstance(text, str) or not text.strip():
        raise ConstraintError("a grammar constraint needs the grammar's text (Lark or GBNF), got an empty one")
    import llguidance

    fmt = "gbnf" if "::=" in text else "lark"
    try:
        compiled = llguidance.grammar_from(fmt, text)
    except ValueError as exc:
        raise ConstraintError(f"invalid grammar: {' '.join(str(exc).split())[:300]}") from None
    return _validated("grammar", text, compiled)


def choice(options: Sequence[str]) -> Constraint:
    """Exactly one of ``options`` (non-empty strings)."""
    if isinstance(options, str) or not isinstance(options, Sequence):
        raise ConstraintError(f"choice needs a list of strings, got {options!r}")
    options = list(options)
    if not options:
        raise ConstraintError("choice needs at least one option; got an empty list")
    if not all(isinstance(o, str) and o for o in options):
        raise ConstraintError(f"choice options must be non-empty strings, got {options!r}")
    import llguidance

    return _validated("choice", tuple(options), llguidance.grammar_from("choice", json.dumps(options)))


_BUILDERS = {"json_schema": json_schema, "regex": regex, "grammar": grammar, "choice": choice}


def from_fields(json_schema: Any = None, regex: Any = None, grammar: Any = None, choice: Any = None,
                constraint: Constraint | None = None) -> Constraint | None:
    """The one constraint named by these fields (the CLI's flags, a batch line's or a request's
    fields), or None.  More than one is an error: they cannot be combined."""
    given = {k: v for k, v in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar),
                               ("choice", choice)) if v is not None}
    if constraint is not None:
        if not isinstance(constraint, Constraint):
            raise ConstraintError(f"constraint must be built with dealign.constraints (json_schema, regex, grammar, "
                                  f"choice), got {type(constraint).__name__}")
        given["constraint"] = constraint
    if len(given) > 1:
        raise ConstraintError(f"give one constraint, not several: {', '.join(given)}")
    if not given:
        return None
    (kind, value), = given.items()
    return value if kind == "constraint" else _BUILDERS[kind](value)


def read_text_or_file(value: str) -> str:
    """A flag's value that may name a file (``--json-schema schema.json``, ``--grammar g.lark``)."""
    stripped = value.strip()
    if stripped[:1] in "{[" or "\n" in stripped:
        return value
    path = Path(stripped)
    try:
        if path.is_file():
            return path.read_text()
    except OSError:
        pass
    return value


__all__ = ["KINDS", "Constraint", "ConstraintError", "choice", "from_fields", "grammar", "json_schema", "regex",
           "read_text_or_file"]
