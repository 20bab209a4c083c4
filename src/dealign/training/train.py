"""``dealign train-reward``: pairwise (Bradley–Terry) training of a reward head on a frozen backbone
(sentence embeddings or a causal LM's hidden states), or of several heads averaged as an ensemble.

The loss is ``-log sigmoid(r(prompt, chosen) - r(prompt, rejected))``.  Pairs are split with a fixed
seed into training and held-out parts; a tenth of the training part is set aside to pick the epoch
(early stopping), so the held-out figures are never used for any choice.  Backbone features are
computed once per text and cached on disk (``DEALIGN_CACHE``/embeddings), so retraining with other
settings takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..models.loading import cache_dir
from ..rewards.backbones import SENTENCE_DEFAULT, LMBackbone, SentenceBackbone, backbone_of
from ..rewards.learned import EmbeddingRewardModel, EnsembleRewardModel, Head
from ..rewards.normalize import Calibration
from .data import DataError, Pair, helpful_pairs, load_pairs, split_pairs, texts_of

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
    members: list[dict[str, Any]] = field(default_factory=list)  # an ensemble's heads, each with its figures


def pairwise_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """Share of pairs whose chosen response scores higher (a tie counts one half)."""
    if not chosen:
        return float("nan")
    return sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected)) / len(chosen)



# Head shapes that held up on HH-RLHF harmless pairs (chosen on the inner validation tenth): a small MLP
# on MiniLM rows; a strongly regularised linear head on the hundreds of LM hidden dimensions.
HEAD_DEFAULTS = {"sentence": {"hidden": 128, "weight_decay": 1e-2}, "lm": {"hidden": 0, "weight_decay": 1.0}}
_SEP = "\x1f"  # joins prompt and response into one cache key for LM rows


def _cached_rows(compute: Callable[[list[str]], Any], keys: list[str], tag: str, dim: int) -> torch.Tensor:
    """Rows for ``keys`` (in order), from ``compute(new_keys)``.  Every row computed with one backbone
    (``tag``) is kept in one cache file (``DEALIGN_CACHE``/embeddings), so a rerun, other settings or
    other pairs built from the same texts compute only what is new."""
    path = cache_dir() / "embeddings" / f"{hashlib.sha256(tag.encode()).hexdigest()[:16]}.pt"
    known: dict[str, torch.Tensor] = {}
    if path.exists():
        try:
            blob = torch.load(path)
            known = dict(zip(blob["texts"], blob["vectors"]))
        except Exception:  # a corrupt cache file is rebuilt
            known = {}
    todo = list(dict.fromkeys(k for k in keys if k not in known))
    if todo:
        known.update(zip(todo, compute(todo)))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"texts": list(known), "vectors": torch.stack(list(known.values()))}, tmp)
        tmp.replace(path)
    return torch.stack([known[k] for k in keys]) if keys else torch.zeros(0, dim)


def pair_features(bb: SentenceBackbone | LMBackbone, pairs: Sequence[Pair], progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen rows, rejected rows) of ``pairs`` under backbone ``bb``, through the disk cache."""
    prompts, chosen, rejected = texts_of(pairs)
    n = len(pairs)
    if isinstance(bb, SentenceBackbone):
        vecs = _cached_rows(lambda todo: bb.embedder.encode(todo, progress=progress), prompts + chosen + rejected,
                            bb.spec, bb.dim)
        e_p = vecs[:n]
        return (bb.rows(torch.cat([e_p, vecs[n : 2 * n]]), prompts, chosen),
                bb.rows(torch.cat([e_p, vecs[2 * n :]]), prompts, rejected))

    def compute(todo: list[str]) -> torch.Tensor:
        ps, rs = zip(*(k.split(_SEP, 1) for k in todo))
        return bb.features(list(ps), list(rs), progress=progress)

    keys = [p + _SEP + r for p, r in zip(prompts + prompts, chosen + rejected)]
    rows = _cached_rows(compute, keys, json.dumps(bb.settings, sort_keys=True), bb.dim)
    return rows[:n], rows[n:]


def _bt_loss(head: Head, c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return -torch.nn.functional.logsigmoid(head(c) - head(r)).mean()


def _fit_head(fit: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor] | None, *,
              kind: str, hidden: int, dropout: float, lr: float, weight_decay: float, epochs: int, batch_size: int,
              patience: int, seed: int, progress: bool, desc: str) -> tuple[Head, list[float], int]:
    """Bradley–Terry training with early stopping on ``val``; returns the best head, the epoch losses and
    the best epoch."""
    from tqdm import tqdm

    fc, fr = fit
    torch.manual_seed(seed)
    head = Head(fc.shape[1], hidden, dropout)
    if kind == "lm":
        head.standardise_on(torch.cat([fc, fr]))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    best: tuple[float, Any, int] = (float("inf"), None, 0)
    bar = tqdm(range(epochs), desc=desc, unit="epoch", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for epoch in bar:
        head.train()
        perm = torch.randperm(len(fc), generator=gen)
        total = 0.0
        for i in range(0, len(fc), batch_size):
            idx = perm[i : i + batch_size]
            loss = _bt_loss(head, fc[idx], fr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(fc))
        head.eval()
        with torch.no_grad():
            score = _bt_loss(head, *val).item() if val is not None else losses[-1]
        if score < best[0]:
            best = (score, {k: v.clone() for k, v in head.state_dict().items()}, epoch + 1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", val=f"{score:.4f}")
        if epoch + 1 - best[2] >= patience:
            break
    bar.close()
    head.load_state_dict(best[1])
    return head.eval(), losses, best[2]


@dataclass
class _Member:
    """A head trained for an ensemble (or alone): its folder name, the model, its raw scores on every
    part of the data (chosen, rejected) and its figures."""

    folder: str
    model: EmbeddingRewardModel
    scores: dict[str, tuple[list[float], list[float]]]
    figures: dict[str, Any]


def _train_member(spec: str, folder: str, parts: dict[str, list[Pair]], about: dict[str, Any], counts: dict[str, Any],
                  *, hidden: int | None, weight_decay: float | None, dropout: float, progress: bool,
                  **fit_kw: Any) -> _Member:
    """One head on backbone ``spec``: features of every part, Bradley–Terry fit, figures, calibration."""
    bb = backbone_of(spec)
    rows = {k: pair_features(bb, v, progress) for k, v in parts.items() if v}
    h = HEAD_DEFAULTS[bb.kind]["hidden"] if hidden is None else hidden
    wd = HEAD_DEFAULTS[bb.kind]["weight_decay"] if weight_decay is None else weight_decay
    head, losses, best_epoch = _fit_head(rows["fit"], rows.get("val"), kind=bb.kind, hidden=h, dropout=dropout,
                                         weight_decay=wd, progress=progress, desc=f"train-reward {spec}", **fit_kw)
    with torch.no_grad():
        scores = {k: (head(c).tolist(), head(r).tolist()) for k, (c, r) in rows.items()}
    figures = {"backbone": spec, "train_accuracy": round(pairwise_accuracy(*scores["fit"]), 4),
               "heldout_accuracy": round(pairwise_accuracy(*scores["held"]), 4), "epochs": best_epoch,
               "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
               "losses": [round(x, 4) for x in losses]}
    config = dict(about, backbone=spec, features=bb.settings, in_features=bb.in_features, dim=bb.dim, hidden=h,
                  dropout=dropout, weight_decay=wd,
                  metrics=dict(counts, **{k: v for k, v in figures.items() if k not in ("backbone", "losses")}))
    cal = Calibration.fit(scores["reference"][0] + scores["reference"][1], "quantile",
                          reference=f"training responses of {about['split']['data']} ({counts['pairs']} pairs)")
    return _Member(folder, EmbeddingRewardModel(head, config, cal), scores, figures)


def _ensemble(members: list[_Member], weights: Sequence[float] | None, about: dict[str, Any],
              counts: dict[str, Any]) -> EnsembleRewardModel:
    """The members' standardised scores averaged with ``weights`` (normalised; equal by default), with its
    own figures and calibration computed from the members' cached scores."""
    total = sum(weights) if weights is not None else float(len(members))
    ws = [w / total for w in weights] if weights is not None else [1.0 / len(members)] * len(members)
    ensemble = EnsembleRewardModel([(m.folder, m.model, w) for m, w in zip(members, ws)], {})

    def mix(part: str, side: int) -> list[float]:  # from the members' scores already computed in training
        return ensemble.combine([m.scores[part][side] for m in members])

    metrics = dict(counts, train_accuracy=round(pairwise_accuracy(mix("fit", 0), mix("fit", 1)), 4),
                   heldout_accuracy=round(pairwise_accuracy(mix("held", 0), mix("held", 1)), 4),
                   members=[dict({k: v for k, v in m.figures.items() if k != "losses"}, folder=m.folder,
                                 weight=round(w, 4)) for m, w in zip(members, ws)])
    ensemble.config = dict(about, combine="sum of weight * (raw - mean) / std over members (mean, std on training "
                           "responses)", metrics=metrics)
    ensemble.calibration = Calibration.fit(mix("reference", 0) + mix("reference", 1), "quantile",
                                           reference=f"training responses of {about['split']['data']} ({counts['pairs']} pairs)")
    return ensemble


def _member_folder(spec: str, taken: set[str]) -> str:
    base = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in Path(spec).stem or spec) or "member"
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def train_reward(
    data: str | Path,
    out: str | Path | None,
    *,
    pairs: str = "preference",
    holdout: float = 0.2,
    seed: int = 0,
    epochs: int = 60,
    hidden: int | None = None,
    dropout: float = 0.1,
    lr: float = 1e-3,
    weight_decay: float | None = None,
    batch_size: int = 64,
    patience: int = 8,
    name: str | None = None,
    backbone: str | Sequence[str] | None = None,
    weights: Sequence[float] | None = None,
    limit: int | None = None,
    by_prompt: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> tuple[EmbeddingRewardModel | EnsembleRewardModel, TrainReport]:
    """Train a reward head from preference pairs in ``data`` and save it to ``out`` (if given).

    ``pairs``: ``"preference"`` uses the file's chosen/rejected pairs; ``"helpful"`` builds the synthetic
    helpfulness pairs of :func:`~dealign.training.data.helpful_pairs` from them (split by dialogue first,
    so no held-out prompt is seen in training).  ``backbone``: ``"minilm"`` (default, the packaged
    all-MiniLM-L6-v2), a sentence-transformers folder, or a causal LM (``"smollm2"``, ``"gemma3-270m"``, a
    folder) whose hidden states the head reads; several backbones train one head each and save their
    ensemble (standardised scores averaged with ``weights``, equal by default).  ``hidden`` /
    ``weight_decay`` default per backbone kind (:data:`HEAD_DEFAULTS`).  ``by_prompt``: hold out whole
    prompts, not single pairs (see :func:`~dealign.training.data.split_pairs`).  Returns the model and a
    :class:`TrainReport`.
    """
    specs = [backbone] if backbone is None or isinstance(backbone, str) else list(backbone)
    specs = [s or SENTENCE_DEFAULT for s in specs]
    if not specs:
        raise DataError("give at least one backbone")
    if len(set(specs)) != len(specs):
        raise DataError(f"a backbone is named twice: {', '.join(specs)}")
    if weights is not None and (len(weights) != len(specs) or any(w < 0 for w in weights) or not sum(weights) > 0):
        raise DataError(f"give one non-negative weight per backbone ({len(specs)}), not all zero; got {list(weights)}")
    if pairs not in PAIR_KINDS:
        raise DataError(f"pairs must be one of {', '.join(PAIR_KINDS)}; got {pairs!r}")
    for what, v in (("epochs", epochs), ("batch_size", batch_size)):
        if v < 1:
            raise DataError(f"{what} must be >= 1, got {v}")
    if hidden is not None and hidden < 0:
        raise DataError(f"hidden must be >= 0 (0 = a linear head), got {hidden}")
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    start = time.perf_counter()
    raw = load_pairs(data, limit=limit)
    train, held = split_pairs(raw, holdout, seed, by_prompt=by_prompt)
    reference = train  # calibration: percentiles among the real training responses
    if pairs == "helpful":
        train, held = helpful_pairs(train, seed), helpful_pairs(held, seed + 1)
        if len(train) < 2 or not held:
            raise DataError(f"{data}: too few non-refusing responses to build helpfulness pairs")
    inner = max(1, len(train) // 10) if len(train) >= 20 else 0
    order = list(range(len(train)))
    random.Random(seed + 7).shuffle(order)
    parts = {"fit": [train[i] for i in order[inner:]], "val": [train[i] for i in order[:inner]],
             "held": held, "reference": reference}
    split = {"data": Path(str(data)).name, "holdout": holdout, "seed": seed, "pairs": pairs, "limit": limit,
             "by_prompt": by_prompt}
    base_name = name or ("helpful" if pairs == "helpful" else Path(str(out or "reward")).name)

    about = {"scores": "prompt (last user turn) + response", "split": split}
    counts = {"pairs": pairs, "train_pairs": len(train), "heldout_pairs": len(held)}
    fit_kw = dict(hidden=hidden, weight_decay=weight_decay, dropout=dropout, lr=lr, epochs=epochs,
                  batch_size=batch_size, patience=patience, seed=seed, progress=progress)
    taken: set[str] = set()
    members = []
    for spec in specs:
        log(f"features of {len(train) + len(held)} pairs from {spec} (cached after the first run) ...")
        folder = _member_folder(spec, taken)
        member_name = base_name if len(specs) == 1 else f"{base_name}_{folder}"
        members.append(_train_member(spec, folder, parts, dict(about, name=member_name), counts, **fit_kw))

    if len(members) == 1:
        model, figures = members[0].model, members[0].figures
        train_acc, held_acc = figures["train_accuracy"], figures["heldout_accuracy"]
        losses, best_epoch = figures["losses"], figures["epochs"]
        member_figures: list[dict[str, Any]] = []
    else:
        model = _ensemble(members, weights, dict(about, name=base_name), counts)
        train_acc, held_acc = model.config["metrics"]["train_accuracy"], model.config["metrics"]["heldout_accuracy"]
        losses, best_epoch = [], 0
        member_figures = model.config["metrics"]["members"]

    report = TrainReport(
        data=str(data), pairs=pairs, train_pairs=len(train), heldout_pairs=len(held),
        train_accuracy=train_acc, heldout_accuracy=held_acc,
        loss_first=losses[0] if losses else float("nan"), loss_last=losses[-1] if losses else float("nan"),
        epochs=best_epoch, seconds=round(time.perf_counter() - start, 1), losses=losses, members=member_figures,
    )
    if len(members) == 1:
        model.config["metrics"]["seconds"] = report.seconds
    if out is not None:
        report.out = str(model.save(out))
    return model, report
