"""The sentence-form judge of `dealign eval`: what a careful reader accepts as a sentence."""

from __future__ import annotations

import pytest

from dealign.evaluation.sentence import judge_sentence

KEYWORDS = ["kid", "dance", "room", "dog", "frisbee", "catch", "throw", "field", "look", "stand", "javelin", "run",
            "track", "door", "knob", "open", "turn", "flash", "light", "music", "lawn", "mower", "push"]


@pytest.mark.parametrize("text", [
    "A dog catches the frisbee that a man throws.",          # subject + finite verb
    "The kid dances around the room.",
    "Stand in the field and look around.",                   # imperative
    "A man sitting on a chair eating food.",                 # caption: noun + participle clause
    "A girl who is dancing in her room.",                    # caption: noun + relative clause
    "The crowd cheers at the track.",                        # verb the small parser reads as a plural noun
    "She looked, stood, and waited.",                        # a series of verbs is not a keyword list
])
def test_real_sentences_pass(text):
    assert judge_sentence(text, KEYWORDS)["sentence"], judge_sentence(text, KEYWORDS)


@pytest.mark.parametrize("text, why", [
    ("Dance, flash, light, music.", "keyword list"),
    ("The door, knob, open, turn.", "keyword list"),
    ("A kid, dancing room.", "keyword list"),
    ("The javelin, run, throw, track are all elements of the javelin, run, throw, track.", "loop"),
    ("The javelin, run, throw, track are all elements of sport.", "keyword list"),
    ("A mowed lawn and a push mower.", "fragment"),
    ("The field, look, stand is a classic example of using a double negative in a sentence.", "about the task"),
    ("Here is a sentence with the words dog and frisbee.", "about the task"),
    ("A dog runs and a dog runs and a dog runs.", "loop"),
    ("", "empty"),
    ("...", "empty"),
])
def test_lists_fragments_loops_and_text_about_the_task_fail(text, why):
    verdict = judge_sentence(text, KEYWORDS)
    assert not verdict["sentence"] and verdict["why"] == why


def test_every_sentence_of_the_answer_must_pass():
    assert judge_sentence("A dog catches the frisbee. Great fun.", KEYWORDS)["sentence"] is False
    assert judge_sentence("A dog catches the frisbee. The kid laughs.", KEYWORDS)["sentence"] is True


def test_a_list_is_only_a_keyword_list_when_the_items_are_keywords():
    # commas between other short items are ordinary English
    assert judge_sentence("Yes, of course, the dog catches it.", KEYWORDS)["sentence"]
