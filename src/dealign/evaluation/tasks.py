"""Evaluation tasks: the rows each task sends through the batch CLI, and the metrics of its answers.

A task supplies items (prompt + reward fields for the batch JSONL), the alignment instruction used by
the start-state-adaptation strategies, and per-answer metrics.  Strategies are per-line settings, so
one batch run answers every (strategy, item) pair and is resumable like any batch run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..rewards import count_words, keyword_coverage
from .data import commongen

# strategy label -> per-line batch settings; "prompt" rows add the task's alignment instruction
STRATEGIES: dict[str, dict[str, Any]] = {
    "greedy": {"strategy": "greedy"},
    "sample": {"strategy": "sample", "temperature": 0.7, "top_p": 0.95},
    "beam": {"strategy": "beam", "beam": 4},
    "best-of-n": {"strategy": "best-of-n", "n": 8},
    "prompt": {"strategy": "greedy", "_instruction": True},
    "deal": {"strategy": "deal"},
    "deal-segment": {"strategy": "deal", "mode": "segment"},
    "prompt+deal": {"strategy": "deal", "_instruction": True},
}


@dataclass
class Item:
    id: str
    prompt: str
    fields: dict[str, Any]  # reward fields for the batch line (keywords, max_words, weights, ...)
    meta: dict[str, Any] = field(default_factory=dict)  # what metrics need (references, limits)


@dataclass
class Task:
    name: str
    describe: str
    instruction: str
    quality: str  # the metric on the quality axis of the plots
    items: Callable[[int, int], list[Item]]
    metrics: Callable[[dict], dict[str, float]]
    corpus_metrics: Callable[[list[dict]], dict[str, float]] | None = None

    def rows(self, n: int, strategies: list[str], max_new_tokens: int, offset: int = 0, seed: int = 0) -> list[dict]:
        """One batch-CLI row per (strategy, item)."""
        unknown = [s for s in strategies if s not in STRATEGIES]
        if unknown:
            raise ValueError(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
        items = self.items(n, offset)
        out = []
        for label in strategies:
            settings = dict(STRATEGIES[label])
            with_instruction = settings.pop("_instruction", False)
            for it in items:
                row = {"id": it.id, "task": self.name, "method": label, "prompt": it.prompt, **it.fields,
                       "max_new_tokens": max_new_tokens, "seed": seed, **settings, "meta": it.meta}
                if with_instruction:
                    row["instruction"] = self.instruction
                out.append(row)
        return out


# keywords (CommonGen) --------------------------------------------------------------------------------------------

def _keyword_items(n: int, offset: int) -> list[Item]:
    return [Item(cs.id, cs.prompt, {"keywords": cs.keywords}, {"references": cs.references}) for cs in commongen(n, offset)]


def _keyword_metrics(row: dict) -> dict[str, float]:
    cov = keyword_coverage(row["text"], row["keywords"])
    return {"soft": cov, "hard": float(cov == 1.0), "hard_finished": float(cov == 1.0 and row["finished"])}


def _reference_metrics(rows: list[dict]) -> dict[str, float]:
    """BLEU-4 (sacrebleu, corpus level, all references) and ROUGE-L F1 (best reference, mean)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    refs = [r["meta"].get("references") or [""] for r in rows]
    width = max(len(x) for x in refs)
    streams = [[x[i] if i < len(x) else "" for x in refs] for i in range(width)]
    bleu = sacrebleu.corpus_bleu([r["text"] for r in rows], streams).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [max(scorer.score(ref, r["text"])["rougeL"].fmeasure for ref in x) for r, x in zip(rows, refs)]
    return {"bleu4": bleu, "rougeL": sum(rouge) / len(rouge)}


KEYWORDS = Task(
    name="keywords",
    describe="CommonGen dev: one sentence using every listed concept; reward = soft keyword coverage",
    instruction="Write one natural, fluent sentence that uses every word the user lists.",
    quality="hard_finished",
    items=_keyword_items,
    metrics=_keyword_metrics,
    corpus_metrics=_reference_metrics,
)


# length --------------------------------------------------------------------------------------------------------

LIMITS = (5, 8, 12)


def _length_items(n: int, offset: int) -> list[Item]:
    """Word-limited instructions about CommonGen concept sets (dev rows from 500 on, apart from the
    keyword task's): the reward is the word limit plus the topic words, so an empty or off-topic
    answer does not win."""
    items = []
    for i, cs in enumerate(commongen(n, 500 + offset)):
        limit = LIMITS[i % len(LIMITS)]
        prompt = f"Describe a scene with {', '.join(cs.keywords)} in at most {limit} words."
        items.append(Item(f"{cs.id}@{limit}", prompt, {"max_words": limit, "keywords": cs.keywords,
                                                        "weights": {"keywords": 0.5}}, {"limit": limit}))
    return items


def _length_metrics(row: dict) -> dict[str, float]:
    words, limit = count_words(row["text"]), row["meta"]["limit"]
    topic = keyword_coverage(row["text"], row["keywords"])
    within = row["finished"] and 0 < words <= limit
    return {"within_limit": float(within), "overshoot": float(max(0, words - limit)), "words": float(words),
            "topic": topic, "within_and_on_topic": float(within and topic >= 0.5)}


LENGTH = Task(
    name="length",
    describe="word-limited scene descriptions (limits 5/8/12); reward = max_words(limit) + 0.5 * topic keywords",
    instruction="Answer within the word limit the user gives, never longer, and stay on the topic.",
    quality="within_and_on_topic",
    items=_length_items,
    metrics=_length_metrics,
)

TASKS = {t.name: t for t in (KEYWORDS, LENGTH)}
