"""``AlignerSpec``: how to build an aligner, as plain data; ``build()`` is the one way the CLI, the
evaluation, the demo and the Ray workers get an ``Aligner``.

A spec rather than a model because a Ray worker must build its own (a model does not travel well
between processes), and because the CLI must check its flags before paying for a load.  ``build``
writes progress notes on stderr, so a command's stdout stays its answer.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..api import Aligner
from ..models.loading import resolve


@dataclass(frozen=True)
class AlignerSpec:
    """A local model (name, folder or GGUF file, as ``--model`` takes) or a remote engine (``engine_url``
    with the ``--engine-*`` options; ``model`` then names the served model's tokenizer).  ``None``
    means the API's default.  Plain data, so it pickles to any node."""

    model: str | None = None
    draft_model: str | None = None
    dtype: str | None = None
    device: str | None = None
    engine_url: str | None = None
    engine_dialect: str | None = None
    engine_model: str | None = None
    engine_top_n: int | None = None

    def localized(self) -> "AlignerSpec":
        """Existing relative paths made absolute, so a worker with another working directory (or on
        another node with the same file system) finds the same files."""
        def absolute(p: str | None) -> str | None:
            return str(Path(p).expanduser().resolve()) if p and Path(p).expanduser().exists() else p

        return replace(self, model=absolute(self.model), draft_model=absolute(self.draft_model))

    def check(self) -> None:
        """Fail before Ray starts on a missing model or tokenizer; a packaged GGUF is also converted
        once here rather than by every actor at the same time."""
        for m in (self.model, self.draft_model) if self.draft_model else (self.model,):
            resolve(m)

    def build(self) -> Aligner:
        """The ``Aligner`` this spec describes: ``Aligner.from_remote`` with an engine URL (the search
        runs here, the forward passes on the engine), else ``Aligner.from_pretrained``."""
        start = time.perf_counter()
        if self.engine_url is not None:
            print(f"connecting to the {self.engine_dialect or 'llamacpp'} engine at {self.engine_url} ...",
                  file=sys.stderr, flush=True)
            given = _given(dialect=self.engine_dialect, model=self.engine_model, top_n=self.engine_top_n)
            aligner = Aligner.from_remote(self.engine_url, tokenizer=self.model, **given)
            print(f"engine ready in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
            return aligner
        print(f"loading model {self.model or '(default)'} ...", file=sys.stderr, flush=True)
        aligner = Aligner.from_pretrained(self.model, **_given(draft_model=self.draft_model, dtype=self.dtype,
                                                               device=self.device))
        print(f"model loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        return aligner


def _given(**options) -> dict:
    """Only the options that were set: the rest are the API's defaults."""
    return {k: v for k, v in options.items() if v is not None}
