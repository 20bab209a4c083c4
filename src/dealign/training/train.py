"""``dealign train-reward``: pairwise (Bradley–Terry) training of a reward head on frozen sentence
embeddings.

The loss is ``-log sigmoid(r(prompt, chosen) - r(prompt, rejected))``.  Pairs are split with a fixed
seed into training and held-out parts; a tenth of the training part is set aside to pick the epoch
(early stopping), so the held-out figures are never used for any choice.  Embeddings are computed once
per text and cached on disk (``DEALIGN_CACHE``/embeddings), so retraining with other settings takes
seconds.
"""

from __future__ import annotations

import hashlib
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .data import DataError, Pair, helpful_pairs, load_pairs, split_pairs, texts_of
from .model import PACKAGED_BACKBONE, EmbeddingRewardModel, Head, backbone_of, features
from ..rewards.normalize import Calibration

PAIR_KINDS = ("preference", "helpful")


@dataclass
class TrainReport:
    """What a training run did and how well the result ranks pairs it never saw."""

    data: str
    pairs: str
    train_pairs: int
    heldout_pairs: int
    train_accuracy: float
    heldout_accuracy: float
    loss_first: float
    loss_last: float
    epochs: int
    seconds: float
    out: str = ""
    losses: list[float] = field(default_factory=list)


def pairwise_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """Share of pairs whose chosen response scores higher (a tie counts one half)."""
    if not chosen:
        return float("nan")
    return sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected)) / len(chosen)


def _embed_cached(emb: Any, texts: list[str], tag: str, progress: bool) -> torch.Tensor:
    """Embeddings of ``texts`` (in order).  Every text embedded with this backbone is kept in one cache
    file per backbone (``DEALIGN_CACHE``/embeddings), so a rerun, other settings or other pairs built
    from the same texts embed only what is new."""
    from ..models.loading import cache_dir

    path = cache_dir() / "embeddings" / f"{hashlib.sha256(tag.encode()).hexdigest()[:16]}.pt"
    known: dict[str, torch.Tensor] = {}
    if path.exists():
        try:
            blob = torch.load(path)
            known = dict(zip(blob["texts"], blob["vectors"]))
        except Exception:  # a corrupt cache file is rebuilt
            known = {}
    todo = list(dict.fromkeys(t for t in texts if t not in known))
    if todo:
        known.update(zip(todo, emb.encode(todo, progress=progress)))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"texts": list(known), "vectors": torch.stack(list(known.values()))}, tmp)
        tmp.replace(path)
    return torch.stack([known[t] for t in texts]) if texts else torch.zeros(0, emb.dim)


def _pair_features(emb: Any, pairs: Sequence[Pair], tag: str, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    prompts, chosen, rejected = texts_of(pairs)
    n = len(pairs)
    vecs = _embed_cached(emb, prompts + chosen + rejected, tag, progress)
    e_p, e_c, e_r = vecs[:n], vecs[n : 2 * n], vecs[2 * n :]
    return (features(e_p, e_c, [len(t.split()) for t in chosen]), features(e_p, e_r, [len(t.split()) for t in rejected]))


def train_reward(
    data: str | Path,
    out: str | Path | None,
    *,
    pairs: str = "preference",
    holdout: float = 0.2,
    seed: int = 0,
    epochs: int = 60,
    hidden: int = 128,
    dropout: float = 0.1,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    batch_size: int = 64,
    patience: int = 8,
    name: str | None = None,
    backbone: str | None = None,
    limit: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> tuple[EmbeddingRewardModel, TrainReport]:
    """Train a reward head from preference pairs in ``data`` and save it to ``out`` (if given).

    ``pairs``: ``"preference"`` uses the file's chosen/rejected pairs; ``"helpful"`` builds the synthetic
    helpfulness pairs of :func:`~dealign.training.data.helpful_pairs` from them (split by dialogue first,
    so no held-out prompt is seen in training).  ``backbone``: a sentence-transformers folder (default:
    the packaged all-MiniLM-L6-v2).  Returns the model and a :class:`TrainReport`.
    """
    if pairs not in PAIR_KINDS:
        raise DataError(f"pairs must be one of {', '.join(PAIR_KINDS)}; got {pairs!r}")
    for what, v in (("epochs", epochs), ("batch_size", batch_size)):
        if v < 1:
            raise DataError(f"{what} must be >= 1, got {v}")
    if hidden < 0:
        raise DataError(f"hidden must be >= 0 (0 = a linear head), got {hidden}")
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    start = time.perf_counter()
    raw = load_pairs(data, limit=limit)
    train, held = split_pairs(raw, holdout, seed)
    reference = train  # calibration: percentiles among the real training responses
    if pairs == "helpful":
        train, held = helpful_pairs(train, seed), helpful_pairs(held, seed + 1)
        if len(train) < 2 or not held:
            raise DataError(f"{data}: too few non-refusing responses to build helpfulness pairs")
    inner = max(1, len(train) // 10) if len(train) >= 20 else 0
    order = list(range(len(train)))
    random.Random(seed + 7).shuffle(order)
    fit = [train[i] for i in order[inner:]]
    val = [train[i] for i in order[:inner]]

    emb = backbone_of(backbone)
    tag = f"{backbone or PACKAGED_BACKBONE}"
    log(f"embedding {len(train) + len(held)} pairs with {tag} (cached after the first run) ...")
    fc, fr = _pair_features(emb, fit, tag, progress)
    vc, vr = _pair_features(emb, val, tag, progress) if val else (None, None)
    hc, hr = _pair_features(emb, held, tag, progress)

    torch.manual_seed(seed)
    head = Head(emb.dim, hidden, dropout)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    best = (float("inf"), None, 0)
    from tqdm import tqdm

    bar = tqdm(range(epochs), desc="train-reward", unit="epoch", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for epoch in bar:
        head.train()
        perm = torch.randperm(len(fit), generator=gen)
        total = 0.0
        for i in range(0, len(fit), batch_size):
            idx = perm[i : i + batch_size]
            loss = -torch.nn.functional.logsigmoid(head(fc[idx]) - head(fr[idx])).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(fit))
        head.eval()
        with torch.no_grad():
            score = -torch.nn.functional.logsigmoid(head(vc) - head(vr)).mean().item() if val else losses[-1]
        if score < best[0]:
            best = (score, {k: v.clone() for k, v in head.state_dict().items()}, epoch + 1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", val=f"{score:.4f}")
        if epoch + 1 - best[2] >= patience:
            break
    bar.close()
    head.load_state_dict(best[1])
    head.eval()
    with torch.no_grad():
        train_acc = pairwise_accuracy(head(fc).tolist(), head(fr).tolist())
        held_acc = pairwise_accuracy(head(hc).tolist(), head(hr).tolist())
        rc, rr = _pair_features(emb, reference, tag, False)  # texts already embedded: memoised
        ref = torch.cat([head(rc), head(rr)]).tolist()

    report = TrainReport(
        data=str(data), pairs=pairs, train_pairs=len(train), heldout_pairs=len(held),
        train_accuracy=round(train_acc, 4), heldout_accuracy=round(held_acc, 4),
        loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4), epochs=best[2],
        seconds=round(time.perf_counter() - start, 1), losses=[round(x, 4) for x in losses],
    )
    config = {
        "name": name or ("helpful" if pairs == "helpful" else Path(str(out or "reward")).name),
        "backbone": backbone or PACKAGED_BACKBONE,
        "dim": emb.dim, "hidden": hidden, "dropout": dropout,
        "scores": "prompt (last user turn) + response",
        "split": {"data": Path(str(data)).name, "holdout": holdout, "seed": seed, "pairs": pairs, "limit": limit},
        "metrics": {k: v for k, v in asdict(report).items() if k not in ("losses", "out", "data")},
    }
    cal = Calibration.fit(ref, "quantile", reference=f"training responses of {Path(str(data)).name} ({pairs} pairs)")
    model = EmbeddingRewardModel(head, config, cal)
    if out is not None:
        report.out = str(model.save(out))
    return model, report
