"""Loading the model for a command, with progress notes on stderr so stdout stays the answer."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..api import Aligner


def load_aligner(model: str | None, **kwargs) -> "Aligner":
    """``Aligner.from_pretrained`` with only the given options (None = the API's default)."""
    from ..api import Aligner  # imports torch: only when a command really needs a model

    given = {k: v for k, v in kwargs.items() if v is not None}
    start = time.perf_counter()
    print(f"loading model {model or '(default)'} ...", file=sys.stderr, flush=True)
    aligner = Aligner.from_pretrained(model, **given)
    print(f"model loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return aligner


def load_remote(url: str, *, dialect: str | None, tokenizer: str | None, model: str | None, top_n: int | None) -> "Aligner":
    """``Aligner.from_remote``: the search runs here, the forward passes on the engine at ``url``;
    ``tokenizer`` is the served model's (the ``--model`` argument: a packaged name, folder, .gguf or
    cached hub id; default the packaged SmolLM2)."""
    from ..api import Aligner

    start = time.perf_counter()
    print(f"connecting to the {dialect or 'llamacpp'} engine at {url} ...", file=sys.stderr, flush=True)
    given = {k: v for k, v in dict(dialect=dialect, model=model, top_n=top_n).items() if v is not None}
    aligner = Aligner.from_remote(url, tokenizer=tokenizer, **given)
    print(f"engine ready in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return aligner
