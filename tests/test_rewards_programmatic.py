"""Tests of the rule-based rewards and of how they combine in a WeightedSum."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dealign.rewards import (
    Reward,
    RewardError,
    WeightedSum,
    as_reward,
    banned,
    custom,
    from_options,
    keyword_coverage,
    keywords,
    keywords_found,
    max_tokens,
    max_words,
    min_tokens,
    min_words,
    must_match,
    must_not_match,
    regex,
    word_range,
)
from dealign.rewards.programmatic import count_words, normalize_keywords


def one(reward: Reward, text: str) -> float:
    return reward([""], [text])[0]


# ---------------------------------------------------------------------------------------------
# keywords


@pytest.mark.parametrize(
    "keyword, text",
    [
        ("dog", "Two dogs played."),
        ("throw", "She is throwing the ball."),
        ("throw", "He threw it far."),
        ("throw", "It was thrown."),
        ("catch", "The dog caught the frisbee."),
        ("catch", "He catches it."),
        ("stop", "The bus stopped."),
        ("stop", "Stopping now."),
        ("run", "They were running."),
        ("run", "She ran home."),
        ("make", "We are making bread."),
        ("make", "She made bread."),
        ("baby", "Two babies slept."),
        ("carry", "He carried the box."),
        ("child", "The children laughed."),
        ("person", "Many people came."),
        ("knife", "Sharp knives."),
        ("lie", "The cat is lying on the mat."),
        ("box", "Boxes everywhere."),
        ("paint", "They painted the wall."),
        ("dance", "She danced."),
        ("fireman", "Three firemen arrived."),
        ("dogs", "A dog barked."),  # keyword given plural, text has base
        ("threw", "Throw it."),  # keyword given irregular past
        ("children", "One child."),
        ("ice cream", "We ate ice   cream."),
        ("ice cream", "We ate ice\ncream."),
        ("ice cream", "Ice-cream for all."),
        ("dog", "I love my dog."),  # punctuation adjacency
        ("dog", "(dog)"),
        ("dog", "the dog's bone"),
        ("DOG", "a Dog and a dOg"),  # case-insensitive both ways
    ],
)
def test_keyword_matches(keyword, text):
    assert keywords_found(text, [keyword]) == [True]


@pytest.mark.parametrize(
    "keyword, text",
    [
        ("cat", "a category"),
        ("cat", "concatenate these"),
        ("cat", "bobcat"),
        ("hop", "I am hoping."),  # hoping belongs to hope, not hop
        ("hat", "She hates it."),
        ("left", "We are leaving."),  # ambiguous past forms are taken literally
        ("saw", "I see it."),
        ("ice cream", "ice and cream"),
        ("dog", ""),
        ("news", "a new thing"),
    ],
)
def test_keyword_does_not_match(keyword, text):
    assert keywords_found(text, [keyword]) == [False]


def test_soft_and_hard_modes():
    text = "A dog caught the frisbee."
    words = ["dog", "frisbee", "catch", "throw"]
    assert one(keywords(words), text) == pytest.approx(0.75)
    assert one(keywords(words, mode="hard"), text) == 0.0
    assert one(keywords(words[:3], mode="hard"), text) == 1.0
    assert keyword_coverage(text, words) == pytest.approx(0.75)
    assert keywords_found(text, words) == [True, True, True, False]
    with pytest.raises(ValueError, match="soft"):
        keywords(words, mode="strict")


def test_keyword_list_normalisation():
    assert normalize_keywords([" Dog ", "dog", "", "  ", "ice  cream", "DOG", "cat"]) == ["Dog", "ice cream", "cat"]
    assert normalize_keywords("dog, frisbee ,,") == ["dog", "frisbee"]
    # duplicates count once: 1 of 2 distinct keywords, not 3 of 4 entries
    assert one(keywords(["dog", "Dog", "dog ", "cat"]), "a dog") == pytest.approx(0.5)
    assert keywords_found("a dog", ["dog", "DOG", "cat"]) == [True, False]
    for empty in ([], ["", "  "], ""):
        with pytest.raises(ValueError, match="empty"):
            keywords(empty)
        with pytest.raises(ValueError, match="empty"):
            keyword_coverage("text", empty)
    with pytest.raises(TypeError):
        keywords(["dog", 3])


def test_keywords_empty_text_and_batch():
    r = keywords(["dog", "cat"])
    assert r(["p", "p", "p"], ["", "cat", "dogs and cats"]) == [0.0, 0.5, 1.0]
    assert r.name == "keywords" and r.upper_bound == 1.0


def test_banned():
    r = banned(["cat", "Dog", "bird"])
    assert r.name == "banned" and r.upper_bound == 1.0
    assert r(["", "", "", ""], ["", "a category", "Dogs and more dogs", "cat, dog; birds"]) == pytest.approx(
        [1.0, 1.0, 2 / 3, 0.0]
    )
    with pytest.raises(ValueError):
        banned([])


# ---------------------------------------------------------------------------------------------
# length


def test_count_words():
    assert count_words("") == 0
    assert count_words("  ...  !! ") == 0
    assert count_words("Don't stop -- well-known, 2024 rocks!") == 5


def test_max_words_grading():
    r = max_words(4)
    assert r.name == "max_words" and r.upper_bound == 1.0
    texts = ["", "one two three", "one two three four", "a b c d e", "a b c d e f g h", "a " * 20]
    assert r([""] * len(texts), texts) == pytest.approx([1.0, 1.0, 1.0, 0.75, 0.0, 0.0])
    assert one(max_words(0), "") == 1.0
    assert one(max_words(0), "word") == 0.0
    with pytest.raises(ValueError):
        max_words(-1)
    with pytest.raises(ValueError):
        max_words(2.5)


def test_min_words_and_range():
    r = min_words(4)
    texts = ["", "one two", "one two three four", "a b c d e f"]
    assert r([""] * 4, texts) == pytest.approx([0.0, 0.5, 1.0, 1.0])
    assert one(min_words(0), "") == 1.0
    rng = word_range(2, 4)
    assert rng([""] * 4, ["a", "a b", "a b c d", "a b c d e"]) == pytest.approx([0.5, 1.0, 1.0, 0.75])
    with pytest.raises(ValueError, match="lo <= hi"):
        word_range(5, 2)


class FakeHFTokenizer:
    def encode(self, text, add_special_tokens=True):
        return ([0] if add_special_tokens else []) + [ord(c) for c in text]  # one token per character


def test_token_limits():
    hf = FakeHFTokenizer()
    assert one(max_tokens(3, hf), "abc") == 1.0  # special tokens not counted
    assert one(max_tokens(3, hf), "abcd") == pytest.approx(2 / 3)
    assert one(min_tokens(4, hf), "ab") == pytest.approx(0.5)
    assert one(min_tokens(4, str.split), "a b c d e") == 1.0  # any callable text -> tokens
    with pytest.raises(TypeError, match="encode"):
        max_tokens(3, object())


# ---------------------------------------------------------------------------------------------
# regex


def test_regex_rewards():
    r = must_match(r"\d+")
    assert r.name == "must_match" and r.upper_bound == 1.0
    assert r(["", ""], ["no digits", "42 cats"]) == [0.0, 1.0]
    nr = must_not_match(r"\bcat\b")
    assert nr.name == "must_not_match"
    assert nr(["", ""], ["a dog", "a cat"]) == [1.0, 0.0]
    # default flags=0: case-sensitive unless asked
    assert one(regex("Cat"), "a cat") == 0.0
    assert one(regex("Cat", flags=re.IGNORECASE), "a cat") == 1.0
    assert one(regex("(?i)Cat"), "a cat") == 1.0
    assert one(regex("cat", must_match=False), "a cat") == 0.0
    assert one(must_match([r"\d", "cat", "zebra"]), "1 cat") == pytest.approx(2 / 3)
    assert one(must_match(re.compile("CAT", re.I)), "a cat") == 1.0


def test_regex_invalid_pattern():
    with pytest.raises(ValueError, match=r"'\(unclosed'.*missing \)"):
        must_match("(unclosed")
    with pytest.raises(ValueError, match=r"\[a-"):
        regex("[a-", must_match=False)


# ---------------------------------------------------------------------------------------------
# combining, custom, error handling


def test_weighted_sum_total_and_breakdown():
    combo = 0.7 * keywords(["dog", "frisbee"]) + 0.3 * max_words(4)
    assert isinstance(combo, WeightedSum)
    assert combo.upper_bound == pytest.approx(1.0)
    res = combo.score(["p", "p"], ["dog frisbee", "a dog ran after a ball"])
    assert res.parts["keywords"] == pytest.approx([1.0, 0.5])
    assert res.parts["max_words"] == pytest.approx([1.0, 0.5])
    assert res.total == pytest.approx([1.0, 0.7 * 0.5 + 0.3 * 0.5])
    assert res.weights == pytest.approx({"keywords": 0.7, "max_words": 0.3})
    assert res.row(1) == pytest.approx({"keywords": 0.5, "max_words": 0.5})


def test_duplicate_texts_are_scored_once():
    seen = []

    def counting(prompts, completions):
        seen.extend(completions)
        return [float(len(c)) for c in completions]

    combo = as_reward(custom(counting, "len"))
    res = combo.score(["p"] * 4, ["aa", "b", "aa", "aa"])
    assert sorted(seen) == ["aa", "b"]
    assert res.total == [2.0, 1.0, 2.0, 2.0]


def test_plain_lambda_without_kwargs_and_finished_context():
    lam = custom(lambda prompts, completions: [1.0 for _ in completions], "ones")
    assert lam.name == "ones"
    assert as_reward(lam).score(["p"], ["x"], finished=[True]).total == [1.0]

    def fin(prompts, completions, finished):
        return [1.0 if f else 0.0 for f in finished]

    res = as_reward(custom(fin, upper_bound=1.0)).score(["p", "p"], ["a", "a"], finished=[True, False])
    assert res.total == [1.0, 0.0]  # same text, different `finished`: scored separately


def test_bad_reward_output_raises_with_name():
    wrong_len = custom(lambda p, c: [0.5], "short")
    with pytest.raises(RewardError, match="'short'.*1 scores for 2"):
        wrong_len(["", ""], ["a", "b"])
    nan = custom(lambda p, c: [math.nan for _ in c], "nanny")
    with pytest.raises(RewardError, match="'nanny'.*non-finite"):
        as_reward(nan).score([""], ["a"])
    boom = custom(lambda p, c: 1 / 0, "boom")
    with pytest.raises(RewardError, match="'boom' raised ZeroDivisionError"):
        boom([""], ["a"])


def test_keywords_bring_the_well_formed_and_finish_rewards_unless_told_otherwise():
    from dealign.rewards.programmatic import FINISH_WITH_KEYWORDS_WEIGHT, WELL_FORMED_WEIGHT

    on = from_options(keywords="dog, cat")
    assert on.names == ["keywords", "well_formed", "finish_with_keywords"]
    assert [w for _, w in on.terms[1:]] == [WELL_FORMED_WEIGHT, FINISH_WITH_KEYWORDS_WEIGHT]
    assert from_options(keywords="dog", weights={"well_formed": 2.0}).terms[1][1] == 2.0
    assert from_options(keywords="dog", weights={"finish_with_keywords": 3.0}).terms[2][1] == 3.0
    assert from_options(keywords="dog", well_formed=False).names == ["keywords", "finish_with_keywords"]
    assert from_options(keywords="dog", finish_with_keywords=False).names == ["keywords", "well_formed"]
    assert from_options(max_words=5).names == ["max_words"]
    assert from_options(max_words=5, well_formed=True).names == ["max_words", "well_formed"]
    with pytest.raises(TypeError, match="well_formed"):
        from_options(keywords="dog", well_formed="yes")
    with pytest.raises(TypeError, match="finish_with_keywords"):
        from_options(keywords="dog", finish_with_keywords=1)
    with pytest.raises(ValueError, match="finish_with_keywords needs keywords"):
        from_options(max_words=5, finish_with_keywords=True)


def test_finish_with_keywords_costs_only_an_early_end():
    from dealign.rewards import finish_with_keywords

    r = finish_with_keywords(["dog", "frisbee"])
    texts = ["A dog runs.", "A dog catches a frisbee.", "A dog runs.", "A dog catches frisbees."]
    # finished one keyword short: 0; finished with both (any inflection): 1; unfinished or cut: 1 whatever it holds
    assert r([""] * 4, texts, finished=[True, True, False, True]) == [0.0, 1.0, 1.0, 1.0]
    assert r([""], ["nothing yet"]) == [1.0]  # no finished flags: nothing has ended
    total = from_options(keywords="dog, frisbee", well_formed=False).score([""] * 2, ["A dog runs."] * 2, finished=[True, False])
    assert total.total == pytest.approx([0.5, 0.5 + 0.5])


def test_from_options():
    assert not from_options()
    assert from_options().score(["p"], ["x"]).total == [0.0]
    combo = from_options(
        keywords=["dog", "cat"],
        max_words=3,
        min_words=1,
        banned=["bird"],
        must_match=r"\.$",
        must_not_match="http",
        weights={"keywords": 0.7, "max_words": 0.3},
        well_formed=False,
        finish_with_keywords=False,
    )
    assert combo.names == ["keywords", "max_words", "min_words", "banned", "must_match", "must_not_match"]
    assert [w for _, w in combo.terms] == [0.7, 0.3, 1.0, 1.0, 1.0, 1.0]
    res = combo.score([""], ["A dog."])
    assert res.row(0) == pytest.approx(
        {"keywords": 0.5, "max_words": 1.0, "min_words": 1.0, "banned": 1.0, "must_match": 1.0, "must_not_match": 1.0}
    )
    assert res.total[0] == pytest.approx(0.35 + 0.3 + 4.0)
    hard = from_options(keywords="dog, cat", keyword_mode="hard", well_formed=False, finish_with_keywords=False)
    assert hard.score([""], ["a dog"]).total == [0.0]
    with pytest.raises(ValueError, match="unknown reward"):
        from_options(keywords=["dog"], weights={"keyword": 1.0})


# ---------------------------------------------------------------------------------------------
# properties

_word = st.from_regex(r"[a-z]{1,8}", fullmatch=True)
_text = st.text(alphabet="abcdefghijklmnopqrstuvwxyz ,.!'-\n", max_size=80)


@settings(max_examples=150, deadline=None)
@given(text=_text, words=st.lists(_word, min_size=1, max_size=5), extra=st.integers(min_value=0, max_value=4))
def test_coverage_is_mean_of_found_and_monotone(text, words, extra):
    found = keywords_found(text, words)
    cov = keyword_coverage(text, words)
    assert 0.0 <= cov <= 1.0
    assert cov == pytest.approx(sum(found) / len(found))
    assert one(keywords(words), text) == pytest.approx(cov)
    longer = text + " " + words[extra % len(words)]
    assert keyword_coverage(longer, words) >= cov
    assert keywords_found(longer, words)[normalize_keywords(words).index(words[extra % len(words)])]


@settings(max_examples=100, deadline=None)
@given(text=_text, n=st.integers(min_value=0, max_value=30))
def test_length_scores_in_unit_interval(text, n):
    for r in (max_words(n), min_words(n), banned(["a", "the"]), must_match("a")):
        assert 0.0 <= one(r, text) <= 1.0
