"""Evaluation data, read in place from ``DEALIGN_DATA`` (default ``../shared/data`` from the project)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

KEYWORD_PROMPT = "Write one short sentence that uses all of these words: {words}."


def data_dir() -> Path:
    env = os.environ.get("DEALIGN_DATA")
    if env:
        return Path(env).expanduser()
    here = Path(__file__).resolve()
    for parent in here.parents:  # a checkout: <root>/src/dealign/... with shared/ beside <root>
        candidate = parent.parent / "shared" / "data"
        if (parent / "pyproject.toml").exists() and candidate.exists():
            return candidate
    return Path.cwd().parent / "shared" / "data"


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"evaluation data not found at {path}; set DEALIGN_DATA to the folder holding commongen/, harmfulq/, hh-rlhf/"
        )
    return path


@dataclass
class ConceptSet:
    id: str
    keywords: list[str]
    references: list[str]

    @property
    def prompt(self) -> str:
        return KEYWORD_PROMPT.format(words=", ".join(self.keywords))


def commongen(n: int | None = None, offset: int = 0, path: Path | None = None) -> list[ConceptSet]:
    """CommonGen dev concept sets in file order; ``field_N#look_V`` -> ``["field", "look"]``."""
    path = _require(path or data_dir() / "commongen" / "commongen.dev.jsonl")
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i < offset:
                continue
            if n is not None and len(out) >= n:
                break
            row = json.loads(line)
            words = [c.rsplit("_", 1)[0] for c in row["concept_set"].split("#")]
            refs = row.get("scene") or []
            out.append(ConceptSet(row["concept_set"], words, list(refs) if isinstance(refs, list) else [refs]))
    return out
