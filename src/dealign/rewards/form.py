"""``well_formed``: a cheap reward for text that reads as a sentence rather than a list, a loop or a
fragment.

Why it exists: a coverage reward is cheapest to satisfy with the keywords themselves ("Dance, flash,
light, music."), and the likelihood terms alone do not tell a caption-like noun phrase ("A couple of
kids in a room.") from a sentence.  So the search is told three things a reader checks at a glance:

* no list: two consecutive comma-separated items of at most two words each ("A kid, dancing room.");
  a series of verbs sharing a subject ("She looked, stood, and waited.") is allowed;
* no loop: no word trigram twice;
* a verb: a finished answer has a finite verb or an auxiliary ("is", "sat", "jumps", "walked"), or a
  participle right after a noun ("A man sitting on a chair").

It is a lexical heuristic (word lists and suffixes, microseconds per text), not a parser: the
evaluation's sentence judge is a dependency parser it shares nothing with (evaluation/sentence.py).
A partial text is penalised only for what more text cannot repair (a list, a loop); the verb is asked
of finished texts.  Scores are 0 or 1 (``upper_bound=1``).
"""

from __future__ import annotations

import re
from typing import Sequence

from .base import Reward
from .lexicon import VERBS as _VERBS

AUXILIARIES = frozenset(
    "is are was were am be been being has have had do does did can could will would shall should may might must "
    "isn't aren't wasn't weren't hasn't haven't didn't doesn't don't can't won't it's that's there's here's "
    "he's she's i'm you're we're they're".split()
)
# irregular past forms (sat, stood, ran, threw ...): unambiguous signs of a finite verb
_PAST = frozenset(f for forms in _VERBS.values() for f in forms if not f.endswith(("ing", "s")) and f not in ("found", "left"))
DETERMINERS = frozenset("a an the this that these those my your his her its our their some every each no one two".split())
# -s words after these are plural nouns ("of kids"), never verbs
NOT_BEFORE_VERB = frozenset("of in on at to for with from by into onto over under near and or but".split()) | DETERMINERS
# -ed / -s words that are not verbs
NOT_VERBS = frozenset("red bed shed seed need speed feed weed bred sled wed hundred kindred sacred naked wicked "
                      "news series species glasses pants jeans shorts clothes stairs".split())

PRONOUNS = frozenset("i you we they he she it who".split())
_BASES = frozenset(_VERBS) | frozenset("walk play jump look sit stand run eat throw catch dance ride swim".split())

_WORD = re.compile(r"[A-Za-z']+")


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def _has_list(text: str) -> bool:
    pieces = [_words(p) for p in text.split(",")]
    for a, b in zip(pieces, pieces[1:]):
        if 0 < len(a) <= 2 and 0 < len(b) <= 2 and not (_verbish(a[-1]) and _verbish(b[-1])):
            return True
    return False


def _verbish(word: str) -> bool:
    return word in _PAST or word in AUXILIARIES or (word.endswith("ed") and len(word) > 4 and word not in NOT_VERBS)


def _loops(words: list[str]) -> bool:
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(grams) != len(set(grams))


def has_verb(text: str) -> bool:
    """A finite verb, an auxiliary, or a participle right after a noun-like word."""
    words = _words(text)
    for i, w in enumerate(words):
        if _verbish(w):
            return True
        prev = words[i - 1] if i else ""
        if prev in PRONOUNS or (w in _BASES and prev.endswith("s") and prev not in NOT_VERBS):
            return True  # "they walk", "dogs run"
        if w.endswith("ing") and len(w) > 4 and prev and prev not in NOT_BEFORE_VERB and not prev.endswith("ing"):
            return True  # "a man sitting", "the kid dancing"
        if (w.endswith("s") and not w.endswith("ss") and len(w) > 3 and w not in NOT_VERBS and i >= 2
                and prev not in NOT_BEFORE_VERB and not prev.endswith("s") and words[i - 2] in DETERMINERS):
            return True  # "the dog runs", "a kid dances"
    return False


def form_score(text: str, finished: bool) -> float:
    """1.0 when nothing is wrong with the text's form (so far), else 0.0."""
    words = _words(text)
    if _has_list(text) or _loops(words):
        return 0.0
    if finished and (not words or not has_verb(text)):
        return 0.0
    return 1.0


def well_formed() -> Reward:
    """A reward of 1 for text that reads as a sentence (see the module docstring), 0 otherwise."""

    def fn(prompts: Sequence[str], completions: Sequence[str], finished: Sequence[bool] | None = None) -> list[float]:
        fin = finished if finished is not None else [True] * len(completions)
        return [form_score(c, f) for c, f in zip(completions, fin)]

    return Reward(fn, "well_formed", upper_bound=1.0)
