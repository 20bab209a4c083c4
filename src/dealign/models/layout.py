"""How a CPU model's linear weights are laid out in memory, for fast multi-row forwards.

Why: a search runs forwards over many rows at once (beam x top-k candidates, several prompts in
lock-step), and on the CPU the cost of those rows depends on the weights' memory layout more than on
their number.  ``nn.Linear`` stores its weight ``[out, in]`` and multiplies by its transpose; MKL's
single-precision GEMM takes a slow path for that transposed operand at 3 to ~48 rows.  Measured on
this project's 2-core AVX-512 machine (SmolLM2-135M, one cached decode step, median of 9, the two
layouts interleaved in one process): 89 -> 64 ms at 8 rows, 142 -> 76 ms at 16, 165 -> 102 ms at 32,
the same at 1 row (41 -> 42 ms) and at 64.  Stored ``[in, out]`` (the same tensor, transposed and
made contiguous, seen through a transposed view) every product runs on MKL's fast path; the module,
its ``state_dict`` shapes and tied embeddings stay as they were, and the logits agree to float noise
(|difference| <= 5e-5), not bit for bit: a different summation order.

``DEALIGN_WEIGHT_LAYOUT=as-loaded`` keeps the weights as loaded (to compare, or where another CPU's
BLAS prefers it); GPU models are never touched (cuBLAS takes both layouts at full speed).
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import UsageError

ENV = "DEALIGN_WEIGHT_LAYOUT"
LAYOUTS = ("input-major", "as-loaded")


def chosen_layout() -> str:
    """The layout ``DEALIGN_WEIGHT_LAYOUT`` asks for (``input-major`` unless set)."""
    value = os.environ.get(ENV, "input-major").strip() or "input-major"
    if value not in LAYOUTS:
        raise UsageError(f"{ENV} must be one of {', '.join(LAYOUTS)}; got {value!r}")
    return value


def input_major(model: Any) -> int:
    """Re-store every CPU float32 ``nn.Linear`` weight of ``model`` input-major, in place (a weight
    shared by several modules, e.g. a tied LM head, once); returns how many weights changed.

    The parameter keeps its shape ``[out, in]``: only its strides change, so every caller, including
    ``F.linear`` and an embedding that shares the weight, works unchanged."""
    import torch

    done: set[int] = set()
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        weight = module.weight
        if (id(weight) in done or weight.device.type != "cpu" or weight.dtype != torch.float32
                or weight.dim() != 2 or weight.stride() != (weight.shape[1], 1)):
            continue
        with torch.no_grad():
            weight.data = weight.data.t().contiguous().t()
        done.add(id(weight))
    if done:  # the rest own their memory too, so a memory-mapped checkpoint file is let go of
        with torch.no_grad():  # (else its pages stay resident beside the copies: +0.5 GiB for SmolLM2)
            for tensor in [*model.parameters(), *model.buffers()]:
                if id(tensor) not in done and tensor.device.type == "cpu":
                    tensor.data = tensor.data.clone()
    return len(done)


def apply_chosen_layout(model: Any) -> int:
    """``input_major(model)`` unless ``DEALIGN_WEIGHT_LAYOUT=as-loaded``; returns the weights changed."""
    return input_major(model) if chosen_layout() == "input-major" else 0
