"""``dealign eval-reward``: how well the packaged R_harmless ranks pairs it never trained on.

Pairwise accuracy (chosen scored above rejected; ties count one half) of R_harmless and its two heads on
their own held-out HH-RLHF harmless-base pairs (the split stored with them), next to untrained signals on
the same pairs: the profanity classifier, embedding similarity to a description of a harmless refusal,
the refusal detector, "the shorter answer", the helpfulness substitute and the LM judge (SmolLM2).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from ..rewards import Reward, embedding_similarity, named_reward, non_toxic
from ..rewards.refusal import is_refusal
from ..rewards.registry import packaged_reward_model
from ..training.train import pairwise_accuracy
from .harmless import heldout_pairs

HARMLESS_DESCRIPTION = "A polite, harmless reply that refuses to help with anything dangerous, illegal or unethical."


def pair_signals(held: Sequence[Any], judge: bool = True) -> list[dict[str, Any]]:
    """Accuracy of each signal on ``held`` (a list of Pair)."""
    signals: list[tuple[str, str, Reward]] = [
        ("R_harmless (ensemble of the two heads below)", "prompt + response", named_reward("harmless")),
        ("  its head on SmolLM2-135M hidden states", "prompt + response", packaged_reward_model("harmless/smollm2")),
        ("  its head on MiniLM embeddings (= harmless_fast)", "prompt + response", named_reward("harmless_fast")),
        ("profanity classifier: 1 - P(offensive)", "response", non_toxic()),
        ("MiniLM similarity to a harmless-refusal description", "response", embedding_similarity(HARMLESS_DESCRIPTION)),
        ("refusal detector (regex)", "response", Reward(lambda p, c: [float(is_refusal(t)) for t in c], "refusal")),
        ("shorter response", "response", Reward(lambda p, c: [-float(len(t.split())) for t in c], "shorter")),
        ("R_helpful substitute (trained head)", "prompt + response", named_reward("helpful")),
    ]
    if judge:
        signals.append(("LM judge SmolLM2-135M: P(Yes) to \"is it harmless?\"", "prompt + response", named_reward("judge_harmless")))
    prompts = [p.prompt for p in held]
    rows = []
    for label, scores_what, reward in signals:
        start = time.perf_counter()
        chosen = reward(prompts, [p.chosen for p in held])
        rejected = reward(prompts, [p.rejected for p in held])
        rows.append({"signal": label, "scores": scores_what, "accuracy": round(pairwise_accuracy(chosen, rejected), 4),
                     "seconds": round(time.perf_counter() - start, 1)})
        print(f"  {label}: {rows[-1]['accuracy']:.3f} ({rows[-1]['seconds']} s)", file=sys.stderr, flush=True)
    return rows


def run_reward_pairs(out: Path, judge: bool = True) -> list[dict[str, Any]]:
    """Every signal's accuracy on R_harmless's held-out pairs; written to ``out``/pairs.summary.json."""
    held = heldout_pairs()
    print(f"{len(held)} held-out harmless-base pairs", file=sys.stderr)
    rows = pair_signals(held, judge=judge)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pairs.summary.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return rows
