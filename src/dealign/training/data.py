"""Preference pairs for reward-model training: reading them, splitting them, and building the
synthetic helpfulness pairs.

Two input shapes are read, from ``.jsonl`` or ``.jsonl.gz``:

- ``{"prompt": "...", "chosen": "...", "rejected": "..."}``: a prompt and two responses;
- HH-RLHF dialogues ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}``: the prompt is
  the last Human turn, the response the last Assistant turn (the earlier turns are shared context).
"""

from __future__ import annotations

import gzip
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..jsonl import json_lines
from ..rewards.refusal import is_refusal

_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")


class DataError(ValueError):
    """Preference data that cannot be read; the message names the file, the line and what to fix."""


@dataclass(frozen=True)
class Pair:
    """One preference: ``chosen`` is the better response to ``prompt``."""

    prompt: str
    chosen: str
    rejected: str
    opening: str = ""  # the conversation's first user turn (HH dialogues; the prompt itself otherwise)


def dialogue_turns(text: str) -> list[tuple[str, str]]:
    """``(role, text)`` of every turn of ``"\n\nHuman: ...\n\nAssistant: ..."``; empty without turn markers."""
    parts = _TURN.split("\n\n" + text.lstrip("\n"))
    return list(zip(parts[1::2], (t.strip() for t in parts[2::2])))  # parts[0] precedes the first marker


def parse_dialogue(text: str) -> tuple[str, str]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b ..."`` -> (last Human turn, last Assistant turn).

    A text without turn markers is a bare response (the prompt is then empty)."""
    turns = dialogue_turns(text)
    if not turns:
        return "", text.strip()
    answers = [i for i, (role, _) in enumerate(turns) if role == "Assistant"]
    last = answers[-1] if answers else len(turns)
    prompt = next((t for role, t in reversed(turns[:last]) if role == "Human"), "")
    return prompt, turns[last][1] if answers else ""


def _open(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def load_pairs(path: str | Path, limit: int | None = None) -> list[Pair]:
    """Read preference pairs from ``path`` (.jsonl or .jsonl.gz, either shape above).  Pairs whose two
    responses are identical carry no preference and are dropped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"no preference data at {path}; give a .jsonl or .jsonl.gz file of chosen/rejected pairs")
    pairs: list[Pair] = []
    try:
        with _open(path) as f:
            for _, where, row in json_lines(f, path.name, DataError):
                if not isinstance(row, dict) or not isinstance(row.get("chosen"), str) or not isinstance(row.get("rejected"), str):
                    raise DataError(f'{where}: needs "chosen" and "rejected" text fields (and optionally "prompt")')
                if isinstance(row.get("prompt"), str):
                    prompt = row["prompt"].strip()
                    pair = Pair(prompt, row["chosen"].strip(), row["rejected"].strip(), prompt)
                else:
                    p1, c = parse_dialogue(row["chosen"])
                    p2, r = parse_dialogue(row["rejected"])
                    opening = next((t for role, t in dialogue_turns(row["chosen"]) if role == "Human"), p1 or p2)
                    pair = Pair(p1 or p2, c, r, opening)
                if pair.chosen != pair.rejected and pair.chosen and pair.rejected:
                    pairs.append(pair)
                if limit is not None and len(pairs) >= limit:
                    break
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if len(pairs) < 2:
        raise DataError(f"{path} holds {len(pairs)} usable pair(s); training needs at least 2")
    return pairs


def split_pairs(pairs: Sequence[Pair], holdout: float, seed: int = 0, by_prompt: bool = False) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out): a fixed-seed shuffle, the last ``holdout`` share held out (at least one pair each).

    ``by_prompt``: shuffle the distinct prompts instead, so every pair of a prompt falls on one side
    (data with several pairs per request -- e.g. one pair cut to several lengths -- would otherwise
    put near-copies of held-out pairs in training)."""
    if not 0.0 < holdout < 1.0:
        raise DataError(f"holdout must be a share between 0 and 1 (e.g. 0.2), got {holdout}")
    groups: list[list[int]] = []
    if by_prompt:
        where: dict[str, int] = {}
        for i, p in enumerate(pairs):
            if p.prompt not in where:
                where[p.prompt] = len(groups)
                groups.append([])
            groups[where[p.prompt]].append(i)
    else:
        groups = [[i] for i in range(len(pairs))]
    if len(groups) < 2:
        raise DataError(f"cannot hold out part of {len(groups)} prompt(s); give pairs for at least two prompts")
    random.Random(seed).shuffle(groups)
    n_hold = min(max(1, round(holdout * len(groups))), len(groups) - 1)
    train = [pairs[i] for g in groups[: len(groups) - n_hold] for i in g]
    held = [pairs[i] for g in groups[len(groups) - n_hold :] for i in g]
    return train, held


def trained_split(split: dict, data: Path) -> tuple[list[Pair], list[Pair]]:
    """(training, held-out) pairs re-split exactly as a reward was trained: ``split`` is the "split" of its
    config (file under ``data/hh-rlhf``, share, seed, limit, by_prompt)."""
    pairs = load_pairs(Path(data) / "hh-rlhf" / split["data"], limit=split.get("limit"))
    return split_pairs(pairs, split["holdout"], split["seed"], by_prompt=split.get("by_prompt", False))


# ------------------------------------------------------------------------------------------------
# Synthetic helpfulness pairs

REFUSALS = [  # canned refusals: the rejected side of half the helpfulness pairs
    "I'm sorry, but I can't help with that.",
    "I can't assist with that request.",
    "Sorry, I'm not able to help with this.",
    "I'm not comfortable answering that.",
    "I won't be able to help you with that.",
    "I'm sorry, I cannot provide that information.",
    "That's not something I can help with.",
    "I'd rather not answer that question.",
]

def helpful_pairs(pairs: Sequence[Pair], seed: int = 0) -> list[Pair]:
    """Synthetic helpfulness pairs from any preference data: a real, non-refusing response (at least
    4 words) to a prompt is preferred to (a) a canned refusal and (b) a response written for another
    prompt.  What a reward trained on them learns: *engage with the question, on topic*.  What it does
    not learn: correctness, depth, or harmlessness (it prefers complying with a harmful request)."""
    rng = random.Random(seed)
    responses = [r for p in pairs for r in (p.chosen, p.rejected)]
    out: list[Pair] = []
    for i, p in enumerate(pairs):
        for resp in dict.fromkeys((p.chosen, p.rejected)):
            if len(resp.split()) < 4 or is_refusal(resp):
                continue
            out.append(Pair(p.prompt, resp, rng.choice(REFUSALS)))
            other = rng.randrange(len(responses))
            if other // 2 == i:  # the other response to the same prompt is not off-topic
                other = (other + 2) % len(responses)
            out.append(Pair(p.prompt, resp, responses[other]))
    return out


def texts_of(pairs: Iterable[Pair]) -> tuple[list[str], list[str], list[str]]:
    ps, cs, rs = [], [], []
    for p in pairs:
        ps.append(p.prompt)
        cs.append(p.chosen)
        rs.append(p.rejected)
    return ps, cs, rs
