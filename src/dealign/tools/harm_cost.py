"""``dealign bench --suite harm-cost``: what R_harmless costs inside the search, in one run.

Seconds per HarmfulQ answer of greedy and of DeAL with each R_harmless variant: the MiniLM head alone
(``harmless_fast``), the ensemble with its SmolLM2 head reading each candidate from the beam it extends,
and the ensemble reading every candidate from scratch (the reference: same answers, slower).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from ..api import Aligner
from ..rewards import named_reward
from ..rewards.learned import EnsembleRewardModel, load_reward_folder
from ..rewards.registry import WEIGHTS_DIR
from ..evaluation.harmless import harmfulq
from ..evaluation.metrics import mean

# DeAL: beam 4, top-k 4, lookahead 4 (the reward sees 5 new tokens per candidate); segment mode commits them all
DEAL_SEGMENT = {"strategy": "deal", "mode": "segment", "beam": 4, "topk": 4, "lookahead": 4, "lam": 10.0}


def run_harm_cost(n: int = 4, max_new_tokens: int = 64, model: str | None = None) -> list[dict[str, Any]]:
    """What R_harmless costs inside the search, in one run: seconds per HarmfulQ answer for greedy and for
    DeAL (segment mode, the harm tasks' settings) with ``harmless_fast`` (MiniLM head only), ``harmless``
    (the ensemble; its SmolLM2 head reads each candidate from the beam it extends) and ``harmless`` read
    naively (every candidate read again from the prompt on), plus how often the two readings agree."""
    questions = harmfulq(n)
    aligner = Aligner.from_pretrained(model)
    ensemble = load_reward_folder(WEIGHTS_DIR / "harmless")
    assert isinstance(ensemble, EnsembleRewardModel)
    lm = next(m.backbone for _, m, _ in ensemble.members if m.config.get("features", {}).get("kind") == "lm")
    r_harmless = named_reward("harmless")
    runs = [("greedy", {"strategy": "greedy"}, None, True),
            ("DeAL + harmless_fast (MiniLM head)", DEAL_SEGMENT, "harmless_fast", True),
            ("DeAL + harmless (ensemble, incremental reading)", DEAL_SEGMENT, "harmless", True),
            ("DeAL + harmless (ensemble, naive reading)", DEAL_SEGMENT, "harmless", False)]
    table, texts_of = [], {}
    for label, settings, reward_name, incremental in runs:
        reward = named_reward(reward_name) if reward_name else None
        if reward is not None:
            reward(["warm-up"], ["loads the model"])
        lm.reset(incremental=incremental)
        rows = []
        for q in questions:
            start = time.perf_counter()
            res = aligner.generate(q, reward=reward, max_new_tokens=max_new_tokens, seed=0, **settings)
            rows.append((time.perf_counter() - start, res))
        lm.incremental = True  # scoring the answers below reads as the search does
        texts_of[label] = [r.text for _, r in rows]
        table.append({"method": label, "s/prompt": round(mean([s for s, _ in rows]), 2),
                      "reward calls/prompt": round(mean([r.stats.get("reward_calls", 0) for _, r in rows]), 1),
                      "candidates scored/prompt": round(mean([r.stats.get("candidates_scored", 0) for _, r in rows]), 1),
                      "R_harmless": round(mean(r_harmless(questions, texts_of[label])), 3)})
        print(f"  {label}: {table[-1]['s/prompt']} s/prompt", file=sys.stderr, flush=True)
    greedy = table[0]["s/prompt"]
    for row in table:
        row["x greedy"] = round(row["s/prompt"] / greedy, 2)
    inc, naive = texts_of[runs[2][0]], texts_of[runs[3][0]]
    table[3]["same answer as incremental"] = f"{sum(a == b for a, b in zip(inc, naive))}/{len(inc)}"
    for row in table:
        row.setdefault("same answer as incremental", "")
    return table

