"""Metrics over generated answers."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch


@torch.inference_mode()
def mean_token_nll(aligner: Any, prompt: str, text: str, *, chat: bool = True) -> float:
    """Mean negative log-likelihood per token of ``text`` under ``aligner``'s model: low for fluent
    text, high for keyword stuffing.  ``chat``: as the answer to ``prompt`` (chat template applied);
    otherwise as plain text after the tokenizer's start token (a base model judging fluency)."""
    if chat:
        prompt_ids, _ = aligner.encode_prompt(prompt)
    else:
        tok = aligner.tokenizer
        prompt_ids = [tok.bos_token_id] if tok.bos_token_id is not None else [min(aligner.backend.eos_ids)]
    answer_ids = aligner.tokenizer.encode(text, add_special_tokens=False)
    if not answer_ids:
        return math.nan
    ids = torch.tensor([prompt_ids + answer_ids], device=aligner.backend.device)
    logits = aligner.backend.model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    lp = torch.log_softmax(logits, -1).gather(1, ids[0, len(prompt_ids) :, None])
    return float(-lp.mean())


def mean(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan
