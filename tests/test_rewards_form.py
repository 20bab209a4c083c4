"""The well_formed reward: lists, loops and verbless answers score 0, sentences 1; partial texts are
judged only on what more text cannot repair."""

from __future__ import annotations

import pytest

from dealign.rewards.form import form_score, has_verb, well_formed


@pytest.mark.parametrize("text", [
    "A dog catches the frisbee.", "The kid dances in the room.", "The cat sat on the floor.",
    "A man sitting on a chair eating food.", "She looked, stood, and waited.", "Dogs run in the park.",
    "They walk to the store.", "The team was watching the crowd.",
])
def test_sentences_score_one(text):
    assert form_score(text, finished=True) == 1.0


@pytest.mark.parametrize("text", [
    "Dance, flash, light, music.",            # a list
    "A kid, dancing room.",
    "The band, the dance, the music.",
    "A couple of kids in a room.",            # no verb
    "A beach volleyball.",
    "A dog runs and a dog runs and a dog runs.",  # a loop
    "",
])
def test_lists_loops_and_fragments_score_zero(text):
    assert form_score(text, finished=True) == 0.0


def test_a_partial_text_is_not_asked_for_its_verb_yet_but_a_list_is_final():
    assert form_score("A couple of kids", finished=False) == 1.0
    assert form_score("Dance, flash", finished=False) == 0.0
    assert form_score("A dog runs and a dog runs and a dog", finished=False) == 0.0


def test_the_reward_reads_finished_from_the_search():
    r = well_formed()
    assert r.upper_bound == 1.0 and r.name == "well_formed"
    assert r(["", ""], ["A couple of kids", "A couple of kids"], finished=[False, True]) == [1.0, 0.0]


def test_has_verb_reads_participles_only_after_a_noun():
    assert has_verb("A man sitting on a chair")
    assert not has_verb("On the sitting chair")
