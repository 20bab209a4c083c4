"""``dealign bench --batch-sizes 1,4,8``: what batching prompts in lock-step buys, in one process, one run.

For greedy and DeAL as a user gets it (the local defaults, each prompt's own keyword reward) it answers
the same CommonGen dev prompts at every batch size (``Aligner.map_batched``) and reports prompts per
second, seconds per prompt, the speed-up over batch size 1, sequential forward passes per prompt (the
whole run's, divided by the prompts), the widest forward (rows), peak memory growth, and the share of
answers identical to batch size 1's: batching must not change what anyone gets.  With ``model_reward``
(a named reward such as ``harmless``) a third row searches with that model reward instead of keywords
(segment mode, the harm tasks' settings), whose forward passes join across the batch too (``dealign.joint``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from ..api import Aligner
from ..evaluation.data import commongen
from ..evaluation.table import markdown_table
from ..evaluation.tasks import HARM_DEAL
from ..rewards import keywords, named_reward
from ..rewards.cache import forget_rows
from .processes import PeakRSS

STRATEGIES = {"greedy": {"strategy": "greedy"}, "deal (default)": {"strategy": "deal"}}
# a model reward's row: segment mode with the harm tasks' settings
MODEL_REWARD_SEARCH = {"strategy": "deal", "mode": "segment", **HARM_DEAL}


@dataclass
class BatchRow:
    strategy: str
    batch_size: int
    prompts: int
    seconds_per_prompt: float
    prompts_per_second: float
    x_batch_1: float
    forward_passes_per_prompt: float
    rows_max: int
    peak_mib: float
    identical: float  # share of answers equal (token for token) to batch size 1's


def run_batch_bench(aligner: Aligner, *, prompts: int = 16, batch_sizes: Sequence[int] = (1, 4, 8, 16),
                    max_new_tokens: int = 32, model_reward: str | None = None,
                    progress: Callable[[str], None] = lambda m: None) -> dict:
    items = commongen(prompts)
    backend = aligner.backend
    rows: list[BatchRow] = []
    plans = [(name, search, None) for name, search in STRATEGIES.items()]
    if model_reward:
        plans.append((f"deal + {model_reward} (segment)", MODEL_REWARD_SEARCH, named_reward(model_reward)))
    for name, search, fixed in plans:
        def answer(al: Aligner, cs, search=search, fixed=fixed) -> list[int]:
            reward = fixed if fixed is not None else keywords(cs.keywords)
            return al.generate(cs.prompt, reward=reward, max_new_tokens=max_new_tokens, **search).token_ids

        answer(aligner, items[0])  # warm-up: first-call allocations are not a batch size's cost
        first: list[list[int]] | None = None
        first_secs = 0.0
        for bs in batch_sizes:
            passes, widest = backend.counters.forward_passes, backend.counters.rows_max
            backend.counters.rows_max = 0
            if getattr(backend, "prefixes", None) is not None:  # each size reads the prompts afresh
                backend.prefixes.clear()
            forget_rows()  # and a model reward computes its rows afresh
            with PeakRSS(release=True) as mem:
                start = time.perf_counter()
                outs = []
                for out, err in aligner.map_batched(answer, items, batch_size=bs):
                    if err is not None:
                        raise err
                    outs.append(out)
                secs = time.perf_counter() - start
            if first is None:
                first, first_secs = outs, secs
            n = len(items)
            rows.append(BatchRow(name, bs, n, secs / n, n / secs, first_secs / secs,
                                 (backend.counters.forward_passes - passes) / n, backend.counters.rows_max, mem.growth,
                                 sum(a == b for a, b in zip(outs, first)) / n))
            backend.counters.rows_max = max(widest, backend.counters.rows_max)
            progress(f"{name} batch {bs}: {secs / n:.2f} s/prompt, x{first_secs / secs:.2f}")
    return {"prompts": prompts, "max_new_tokens": max_new_tokens, "model_reward": model_reward,
            "threads": torch.get_num_threads(),
            "device": str(getattr(backend, "device", "cpu")), "rows": [asdict(r) for r in rows]}


def markdown(report: dict) -> str:
    cols = ["strategy", "batch_size", "seconds_per_prompt", "prompts_per_second", "x_batch_1",
            "forward_passes_per_prompt", "rows_max", "peak_mib", "identical"]
    head = (f"{report['prompts']} CommonGen dev prompts, {report['max_new_tokens']} new tokens, "
            f"{report['threads']} threads, device {report['device']}\n\n")
    def cell(col: str, v) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return head + markdown_table(report["rows"], cols, cell=cell)
