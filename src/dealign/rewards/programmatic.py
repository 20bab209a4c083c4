"""Cheap rule-based rewards: keywords, length limits, regular expressions, banned words.

Every factory returns a :class:`~dealign.rewards.base.Reward` whose scores lie in [0, 1]
(``upper_bound=1.0``) and that looks only at the completion, never the prompt.  They are pure Python
and run in microseconds per text, so the search can call them on every candidate at every step.

The search scores *unfinished* texts too (the prefix generated so far plus a short lookahead), so each
factory's docstring says how a partial text is treated.  A rule that can only get worse as text grows
(a banned word, a length limit) penalises a prefix at once; a rule that can still be satisfied later
(a missing keyword, a regex that has not matched yet) gives the partial credit it has earned so far.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

from .base import Reward, RewardFn, WeightedSum
from .form import well_formed as _well_formed
from .lexicon import AMBIGUOUS_FORMS, BASE_OF, NOT_PLURAL, NOUNS, VERBS

__all__ = [
    "keywords",
    "keywords_found",
    "keyword_coverage",
    "normalize_keywords",
    "banned",
    "max_words",
    "min_words",
    "word_range",
    "max_tokens",
    "min_tokens",
    "count_words",
    "regex",
    "must_match",
    "must_not_match",
    "custom",
    "from_options",
]

# Inflection tables (rewards/lexicon.py).  Matching is deliberately permissive: generating a non-word such
# as "catted" costs nothing, while missing "threw" for "throw" makes the search chase a keyword it already has.
_VERBS, _NOUNS, _BASE_OF = VERBS, NOUNS, BASE_OF
_AMBIGUOUS_FORMS, _NOT_PLURAL = AMBIGUOUS_FORMS, NOT_PLURAL

_VOWELS = "aeiou"


def _is_cvc(w: str) -> bool:
    """Ends consonant-vowel-consonant ("stop", "quit"), the shape that doubles before -ed/-ing."""
    if len(w) < 3 or w[-1] in _VOWELS + "wxy" or w[-2] not in _VOWELS or not w[-1].isalpha():
        return False
    return w[-3] not in _VOWELS or w[-3] == "u" and w[-4:-3] == "q"


def _regular_forms(w: str, past: bool = True) -> set[str]:
    """``w`` plus its regular inflections: -s/-es/-ies, -ed/-d/-ied, -ing (e-drop, ie->ying, doubling),
    and the -f(e)->-ves and -man->-men plurals.  Over-generation is harmless (see the tables above)."""
    forms = {w}
    if not w[-1:].isalpha():
        return forms
    cons_y = len(w) > 1 and w.endswith("y") and w[-2] not in _VOWELS
    if cons_y:
        forms.add(w[:-1] + "ies")
    else:
        forms.add(w + "s")
        if w.endswith(("s", "x", "z", "ch", "sh", "o")):
            forms.add(w + "es")
    if w.endswith("fe"):
        forms.add(w[:-2] + "ves")
    elif w.endswith("f"):
        forms.add(w[:-1] + "ves")
    if w.endswith("man") and len(w) > 3:
        forms.add(w[:-3] + "men")

    if w.endswith("ie"):
        ing, ed = [w[:-2] + "ying"], [w + "d"]
    elif w.endswith("e"):
        keep_e = len(w) <= 2 or w.endswith(("ee", "ye", "oe"))  # "being", "seeing", "dyeing"
        ing, ed = [w + "ing" if keep_e else w[:-1] + "ing"], [w + "d"]
    elif cons_y:
        ing, ed = [w + "ing"], [w[:-1] + "ied"]
    elif _is_cvc(w):
        dbl = w + w[-1]
        ing, ed = [dbl + "ing"], [dbl + "ed"]
        if len(re.findall(r"[aeiouy]+", w)) > 1:  # "visiting" but "beginning": stress decides, allow both
            ing.append(w + "ing")
            ed.append(w + "ed")
    else:
        ing, ed = [w + "ing"], [w + "ed"]
    forms.update(ing)
    if past:
        forms.update(ed)
    return forms


def _lemmas(w: str) -> set[str]:
    """Base forms a (lower-case) keyword word may be an inflection of, itself included.

    Only irregular forms and -s/-es/-ies plurals are undone: stripping -ed/-ing guesses wrong too often
    ("evening" is not "even" + ing, "wicked" is not "wick" + ed)."""
    out = {w} | _BASE_OF.get(w, set())
    if w in _VERBS or w in _NOUNS or w in _AMBIGUOUS_FORMS or w in _NOT_PLURAL:
        return out
    if len(w) >= 4 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        cands = {w[:-1], w[:-2]} | ({w[:-3] + "y"} if w.endswith("ies") else set())
        out |= {b for b in cands if len(b) >= 3 and re.search("[aeiouy]", b) and w in _regular_forms(b)}
    return out


def _word_forms(word: str) -> set[str]:
    """Every surface form that counts as ``word`` (lower-case), plus ``word`` itself as given."""
    forms = {word}
    lemmas = _lemmas(word.lower())
    if len(lemmas) > 1:  # given inflected ("dogs", "threw"): inflect the base, not the form
        lemmas.discard(word.lower())
    for lemma in lemmas:
        if lemma in _VERBS:
            forms |= {lemma, *_VERBS[lemma]} | _regular_forms(lemma, past=False)
        elif lemma in _NOUNS:
            forms |= {*_NOUNS[lemma]} | _regular_forms(lemma)
        else:
            forms |= _regular_forms(lemma)
    return forms


@functools.lru_cache(maxsize=8192)
def _keyword_pattern(keyword: str) -> re.Pattern[str]:
    """Compiled matcher for one normalised keyword (cached: the search rescores the same keywords on
    every step).  Each word may be inflected; words of a phrase are separated by any whitespace or a
    hyphen; the match must not touch another word character on either side."""
    parts = []
    for word in keyword.split():
        alts = sorted(_word_forms(word), key=lambda s: (-len(s), s))
        parts.append("(?:" + "|".join(map(re.escape, alts)) + ")")
    return re.compile(r"(?<!\w)" + r"(?:\s+|\s*-\s*)".join(parts) + r"(?!\w)", re.IGNORECASE)


# ------------------------------------------------------------------------------------------------
# Keywords


def normalize_keywords(words: str | Iterable[str]) -> list[str]:
    """Clean a keyword list: strip, collapse inner whitespace, drop empties, dedupe case-insensitively
    (first spelling kept, order kept).  A single string is split on commas ("dog, frisbee").

    Raises ValueError when nothing is left, since an empty keyword set would score every text 1."""
    if isinstance(words, str):
        words = words.split(",")
    out: dict[str, str] = {}
    for w in words:
        if not isinstance(w, str):
            raise TypeError(f"keywords must be strings, got {type(w).__name__}: {w!r}")
        w = " ".join(w.split())
        if w:
            out.setdefault(w.casefold(), w)
    if not out:
        raise ValueError("the keyword list is empty: give at least one non-blank keyword")
    return list(out.values())


def _found(text: str, words: Sequence[str]) -> list[bool]:
    return [_keyword_pattern(w).search(text) is not None for w in words]


def keywords_found(text: str, words: str | Iterable[str]) -> list[bool]:
    """For each keyword of ``normalize_keywords(words)`` (so one per *distinct* keyword), whether the
    text contains it as a whole word, case-insensitively, in any simple inflection."""
    return _found(text, normalize_keywords(words))


def keyword_coverage(text: str, words: str | Iterable[str]) -> float:
    """Fraction of the distinct keywords that the text contains (the mean of ``keywords_found``)."""
    found = keywords_found(text, words)
    return sum(found) / len(found)


def keywords(words: str | Iterable[str], mode: str = "soft") -> Reward:
    """Reward for using the given keywords.

    ``soft``: fraction of keywords present; ``hard``: 1.0 only when all are present.  A keyword counts
    when it appears as a whole word, case-insensitively, as given or in a simple inflection: -s/-es/-ies,
    -ed/-d/-ied, -ing (make->making, run->running, lie->lying), common irregular verbs (throw->threw,
    thrown) and plurals (child->children); a keyword given as an -s plural or irregular form also
    matches its base ("dogs" -> "dog", "threw" -> "throw").  Multi-word keywords ("ice cream") match as
    a phrase with any whitespace or a hyphen between the words.

    Unfinished texts are scored as they stand: soft mode gives credit for the keywords already present,
    which can only rise as the text grows, while hard mode stays 0 until the last keyword appears (so it
    gives the search nothing to follow on partial texts: prefer soft for guidance).
    """
    if mode not in ("soft", "hard"):
        raise ValueError(f"keyword mode must be 'soft' or 'hard', got {mode!r}")
    kws = normalize_keywords(words)
    patterns = [_keyword_pattern(w) for w in kws]

    def score(prompts: list[str], completions: list[str]) -> list[float]:
        out = []
        for text in completions:
            hits = sum(p.search(text) is not None for p in patterns)
            out.append(hits / len(patterns) if mode == "soft" else float(hits == len(patterns)))
        return out

    return Reward(score, "keywords", upper_bound=1.0)


def finish_with_keywords(words: str | Iterable[str]) -> Reward:
    """1.0 unless the text has *finished* (ended with end-of-sequence) without every keyword: then 0.0.

    Why: a coverage reward says nothing about *when* an answer may stop, so the search happily ends a
    good sentence one keyword short when every continuation that fits the last keyword in costs more
    than the keyword is worth.  This term makes ending early cost its weight (times lam) without
    touching how partial texts are ranked: an unfinished text, or one cut by the token budget, scores
    1.0 whatever it holds.  On its own it would not guide the search; beside ``keywords`` it keeps the
    stop token from winning while a keyword is missing (docs/fluency.md, "Finishing with every keyword")."""
    patterns = [_keyword_pattern(w) for w in normalize_keywords(words)]

    def score(prompts: list[str], completions: list[str], finished: Sequence[bool] | None = None) -> list[float]:
        fin = finished if finished is not None else [False] * len(completions)
        return [0.0 if done and not all(p.search(t) for p in patterns) else 1.0 for t, done in zip(completions, fin)]

    return Reward(score, "finish_with_keywords", upper_bound=1.0)


def banned(words: str | Iterable[str]) -> Reward:
    """Penalty for banned words: ``1 - (distinct banned words present) / (number of banned words)``.

    Matching is the same as for :func:`keywords` (whole word, case-insensitive, inflections).
    Unfinished texts are penalised at once: a banned word already in the prefix cannot be taken back.
    """
    kws = normalize_keywords(words)
    patterns = [_keyword_pattern(w) for w in kws]

    def score(prompts: list[str], completions: list[str]) -> list[float]:
        return [1.0 - sum(p.search(t) is not None for p in patterns) / len(patterns) for t in completions]

    return Reward(score, "banned", upper_bound=1.0)


# ------------------------------------------------------------------------------------------------
# Length

_WORD = re.compile(r"\w+(?:['\u2019-]\w+)*")


def count_words(text: str) -> int:
    """Number of words: runs of letters/digits/underscore, joined by inner apostrophes or hyphens
    ("don't", "well-known" and "2024" are one word each; punctuation and emoji are not words)."""
    return len(_WORD.findall(text))


def _limit(n: Any, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, float)) or n != int(n) or n < 0:
        raise ValueError(f"{what} must be a non-negative whole number, got {n!r}")
    return int(n)


def _at_most(count: int, n: int) -> float:
    return 1.0 if count <= n else max(0.0, 1.0 - (count - n) / max(n, 1))


def _at_least(count: int, n: int) -> float:
    return 1.0 if n == 0 else min(1.0, count / n)


def _length_reward(counter: Callable[[str], int], grade: Callable[[int], float], name: str) -> Reward:
    def score(prompts: list[str], completions: list[str]) -> list[float]:
        return [grade(counter(t)) for t in completions]

    return Reward(score, name, upper_bound=1.0)


def max_words(n: int) -> Reward:
    """1.0 up to ``n`` words (see :func:`count_words`), then ``max(0, 1 - (count - n) / max(n, 1))``:
    0 at twice the limit.  Unfinished texts are scored as they stand: a prefix already over the limit can
    only get longer, so penalising it early steers the search away from it."""
    n = _limit(n, "max_words")
    return _length_reward(count_words, lambda c: _at_most(c, n), "max_words")


def min_words(n: int) -> Reward:
    """``min(1, count / n)`` (1.0 when n is 0).  Unfinished texts are scored as they stand, so a prefix
    gets partial credit that grows as it lengthens; the rule only bites on texts that end too early."""
    n = _limit(n, "min_words")
    return _length_reward(count_words, lambda c: _at_least(c, n), "min_words")


def word_range(lo: int, hi: int) -> Reward:
    """``min(min_words(lo), max_words(hi))``.  With lo <= hi the two never fall below 1 together, so the
    minimum equals the product.  Unfinished texts: partial credit while short, penalised once too long."""
    lo, hi = _limit(lo, "word_range lo"), _limit(hi, "word_range hi")
    if lo > hi:
        raise ValueError(f"word_range needs lo <= hi, got lo={lo}, hi={hi}")
    return _length_reward(count_words, lambda c: min(_at_least(c, lo), _at_most(c, hi)), "word_range")


def _token_counter(tokenizer: Any) -> Callable[[str], int]:
    """``len`` of the token list, from a Hugging Face tokenizer (``.encode(text, add_special_tokens=False)``,
    so BOS/EOS are not counted) or from a callable text -> tokens."""
    encode = getattr(tokenizer, "encode", None)
    if callable(encode):
        return lambda text: len(encode(text, add_special_tokens=False))
    if callable(tokenizer):
        return lambda text: len(tokenizer(text))
    raise TypeError(
        "tokenizer must have .encode(text, add_special_tokens=False) (a Hugging Face tokenizer) or be a "
        f"callable text -> list of tokens; got {type(tokenizer).__name__}"
    )


def max_tokens(n: int, tokenizer: Any) -> Reward:
    """Like :func:`max_words` but counting the completion's tokens (encoded on its own, which can differ
    by a token or so from how it was generated after the prompt).  Unfinished texts are scored as they
    stand: a prefix over the limit only grows."""
    n = _limit(n, "max_tokens")
    return _length_reward(_token_counter(tokenizer), lambda c: _at_most(c, n), "max_tokens")


def min_tokens(n: int, tokenizer: Any) -> Reward:
    """Like :func:`min_words` but counting tokens: ``min(1, count / n)``.  Unfinished texts get partial
    credit that grows as they lengthen."""
    n = _limit(n, "min_tokens")
    return _length_reward(_token_counter(tokenizer), lambda c: _at_least(c, n), "min_tokens")


# ------------------------------------------------------------------------------------------------
# Regular expressions


def _compile(pattern: str | re.Pattern[str], flags: int) -> re.Pattern[str]:
    if isinstance(pattern, re.Pattern):
        return pattern if not flags else re.compile(pattern.pattern, pattern.flags | flags)
    if not isinstance(pattern, str):
        raise TypeError(f"a regex pattern must be a string, got {type(pattern).__name__}")
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None


def regex(
    pattern: str | re.Pattern[str] | Sequence[str | re.Pattern[str]],
    must_match: bool = True,
    flags: int = 0,
) -> Reward:
    """Reward for ``re.search(pattern, completion, flags)`` finding (``must_match=True``) or not finding
    the pattern: 1.0 or 0.0.  Given several patterns, the score is the fraction that behave as wanted.

    ``flags`` defaults to 0, as in ``re`` itself, so patterns are case-sensitive unless they say
    otherwise (pass ``re.IGNORECASE`` or start the pattern with ``(?i)``).  Unfinished texts are scored as
    they stand: with must_match a text that has not matched yet scores 0 although it may still match
    later (so it guides weakly until the match appears); with must_not_match a match in the prefix is
    permanent and penalised at once."""
    pats = [pattern] if isinstance(pattern, (str, re.Pattern)) else list(pattern)
    if not pats:
        raise ValueError("regex needs at least one pattern")
    compiled = [_compile(p, flags) for p in pats]
    want = bool(must_match)

    def score(prompts: list[str], completions: list[str]) -> list[float]:
        return [sum((p.search(t) is not None) == want for p in compiled) / len(compiled) for t in completions]

    return Reward(score, "must_match" if want else "must_not_match", upper_bound=1.0)


def must_match(pattern: str | re.Pattern[str] | Sequence[str | re.Pattern[str]], flags: int = 0) -> Reward:
    """``regex(pattern, must_match=True)``: 1.0 once the pattern is found; an unfinished text that has
    not matched yet scores 0, though it may still match later."""
    return regex(pattern, must_match=True, flags=flags)


def must_not_match(pattern: str | re.Pattern[str] | Sequence[str | re.Pattern[str]], flags: int = 0) -> Reward:
    """``regex(pattern, must_match=False)``: 0.0 when the pattern is found; a match in an unfinished
    text's prefix is permanent, so it is penalised at once."""
    return regex(pattern, must_match=False, flags=flags)


# ------------------------------------------------------------------------------------------------
# Custom and combined


def custom(fn: RewardFn, name: str | None = None, **kw: Any) -> Reward:
    """Wrap any callable ``fn(prompts, completions[, finished=...]) -> list[float]`` as a Reward
    (``kw``: ``every_n_tokens``, ``finished_only``, ``upper_bound``).  How unfinished texts are treated is
    up to ``fn``: it receives ``finished`` if it accepts that keyword or ``**kwargs``."""
    return Reward(fn, name, **kw)


# from_options' parameters shadow the factories of the same name.
_keywords, _max_words, _min_words, _banned = keywords, max_words, min_words, banned
_must_match, _must_not_match, _finish_with_keywords = must_match, must_not_match, finish_with_keywords
_OPTION_NAMES = ("keywords", "max_words", "min_words", "banned", "must_match", "must_not_match", "well_formed",
                 "finish_with_keywords")


def from_options(
    keywords: str | Iterable[str] | None = None,
    keyword_mode: str = "soft",
    max_words: int | None = None,
    min_words: int | None = None,
    banned: str | Iterable[str] | None = None,
    must_match: str | Sequence[str] | None = None,
    must_not_match: str | Sequence[str] | None = None,
    weights: Mapping[str, float] | None = None,
    well_formed: bool | None = None,
    finish_with_keywords: bool | None = None,
) -> WeightedSum:
    """Build the weighted sum described by CLI flags / batch-JSONL fields; options left as None are
    skipped, so nothing given yields an empty WeightedSum.  Every term has weight 1.0 unless ``weights``
    (reward name -> weight, names as in ``_OPTION_NAMES``) says otherwise.

    ``well_formed`` (see ``rewards/form.py``): None means "on when keywords are asked for" -- a list
    of the keywords is what a coverage reward alone buys -- at weight ``WELL_FORMED_WEIGHT``; True /
    False force it on / off.  ``finish_with_keywords`` likewise (None: on with keywords, at weight
    ``FINISH_WITH_KEYWORDS_WEIGHT``): ending before every keyword is in costs that weight."""
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(_OPTION_NAMES))
    if unknown:
        raise ValueError(f"unknown reward name(s) in weights: {unknown}; known: {list(_OPTION_NAMES)}")
    terms = []
    for name, value, build in (
        ("keywords", keywords, lambda v: _keywords(v, keyword_mode)),
        ("max_words", max_words, _max_words),
        ("min_words", min_words, _min_words),
        ("banned", banned, _banned),
        ("must_match", must_match, _must_match),
        ("must_not_match", must_not_match, _must_not_match),
    ):
        if value is not None:
            terms.append((build(value), weights.get(name, 1.0)))
    if _switched_on("well_formed", well_formed, keywords):
        terms.append((_well_formed(), weights.get("well_formed", WELL_FORMED_WEIGHT)))
    if _switched_on("finish_with_keywords", finish_with_keywords, keywords):
        if keywords is None:
            raise ValueError("finish_with_keywords needs keywords: give the words the answer must hold before it ends")
        terms.append((_finish_with_keywords(keywords), weights.get("finish_with_keywords", FINISH_WITH_KEYWORDS_WEIGHT)))
    return WeightedSum(terms)


def _switched_on(name: str, on: bool | None, keywords: Any) -> bool:
    """A term that keywords bring: None means "on when keywords are asked for"; else it must be a bool."""
    if on is None:
        return keywords is not None
    if not isinstance(on, bool):
        raise TypeError(f"{name} must be true or false, got {on!r}")
    return on


# chosen on CommonGen dev rows 200-229 (docs/fluency.md): with lam 60 a non-sentence costs 30 nats
WELL_FORMED_WEIGHT = 0.5
# chosen on the same rows: ending a sentence one keyword short costs 30 nats, so it goes on to use the word
FINISH_WITH_KEYWORDS_WEIGHT = 0.5
