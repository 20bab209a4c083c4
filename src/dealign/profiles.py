"""Alignment profiles: rewards, weights, search settings and start state chosen together, under one name.

Why: making a model harmless takes several settings that only work together (a reward, its weight, a
search wide enough at the opening to reach a refusal, the alignment instruction); a user should not
have to find them.  A profile is a set of request settings -- the batch fields of ``settings.py`` --
applied as if they were given where the profile is given, *beneath* the fields given beside it: any
field can still be overridden (``--profile safe --lam 5`` searches with lam 5), and such an override
is reported in one line.  ``dealign profiles`` lists what each profile sets.

This module imports nothing of ours but the errors, so the settings, the API, the CLI and the server
can all read it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import UsageError

SAFETY_INSTRUCTION = (
    "You are a helpful and harmless assistant. If a request could help someone cause harm (anything dangerous, "
    "illegal, unethical or hurtful), politely refuse and briefly say why. Otherwise, answer helpfully."
)


@dataclass(frozen=True)
class Profile:
    """A named set of request settings; ``status`` says how far it has been measured."""

    name: str
    summary: str
    values: Mapping[str, Any] = field(default_factory=dict)
    status: str = ""


PROFILES: dict[str, Profile] = {
    "safe": Profile(
        "safe",
        "refuse harmful requests, answer the others: R_safety (declining a harmful request over answering it, "
        "answering a benign one over declining it) plus half of harm_gated (so a benign answer must also engage), "
        "with the safety instruction as the start state; a wide "
        "token-level search over the first 8 tokens, where a refusal is decided, then segments of 9 tokens, "
        "4 states, 1 action each; log-probability per token, so a long refusal is not outscored by a short answer",
        {
            "instruction": SAFETY_INSTRUCTION,
            "named_rewards": {"safety": 1.0, "harm_gated": 0.5},
            "strategy": "deal", "beam": 4, "open_tokens": 8, "open_topk": 8, "open_lookahead": 2,
            "mode": "segment", "topk": 1, "lookahead": 8, "lam": 30.0, "fluency": 0.0, "length_penalty": 1.0,
        },
        status="provisional (issue 13): on held-out prompts with SmolLM2-135M-Instruct the refusal matcher finds 0.57 "
               "of harmful requests refused (greedy 0.10; the rest mostly decline in other words) and 0.00 of benign "
               "ones, though a third of benign answers do not answer; 0.27 under the continuation attack, at 3.9x and "
               "2.9x greedy's time; the target is 0.90",
    ),
}


def get_profile(name: Any) -> Profile:
    """The profile called ``name``; a one-line error naming the closest one for a typo."""
    if not isinstance(name, str):
        raise UsageError(f"profile must be a profile name (a string), got {name!r}; see `dealign profiles`")
    try:
        return PROFILES[name]
    except KeyError:
        close = difflib.get_close_matches(name, PROFILES, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"unknown profile {name!r}{hint}; known: {', '.join(PROFILES)} (see `dealign profiles`)") from None


def overridden(profile: Profile, values: Mapping[str, Any]) -> list[str]:
    """One line per field given beside ``profile`` that changes what the profile sets (the field wins)."""
    lines = []
    for name, value in values.items():
        if name not in profile.values or value is None:
            continue
        ours = profile.values[name]
        if isinstance(value, Mapping) and isinstance(ours, Mapping):  # weights, named_rewards: merged name by name
            lines += [f"{name}.{key}={value[key]!r} overrides the {profile.name} profile's {name}.{key}={ours[key]!r}"
                      for key in value if key in ours and value[key] != ours[key]]
        elif value != ours:
            lines.append(f"{name}={value!r} overrides the {profile.name} profile's {name}={ours!r}")
    return lines


def describe(profile: Profile) -> str:
    """What ``dealign profiles`` prints for one profile."""
    lines = [f"{profile.name}: {profile.summary}"]
    lines += [f"  {name} = {value!r}" for name, value in profile.values.items()]
    if profile.status:
        lines.append(f"  status: {profile.status}")
    return "\n".join(lines)
