"""Learned rewards: a small trained head on a frozen backbone, an ensemble of them, and their folders (what
the search scores with; ``dealign train-reward`` fits the heads, see :mod:`dealign.training`).

A head maps one feature row per (prompt, response) to a score; the backbone that makes the rows is
frozen (see :mod:`.backbones`: MiniLM sentence embeddings, or a causal LM's hidden states read after
the prompt).  Only the head is trained (pairwise, Bradley–Terry), so it is a few hundred kB at most
and ships inside the package.

An ensemble averages the *standardised* raw scores of several heads (each head's score minus its mean,
over its standard deviation, both on its training responses) with weights; heads on different
backbones make different mistakes, so the average ranks pairs better than either alone.

Folders: a head's folder holds ``dealign_reward.json`` (what it is, the backbone and its settings, the
head's shape, the calibration fitted on its training responses, the training figures) and
``head.safetensors``.  An ensemble's folder holds ``dealign_reward.json`` (members and weights, its own
calibration, its figures) and one sub-folder per member.  :func:`load_reward_folder` opens either.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .backbones import SENTENCE_DEFAULT, LMBackbone, SentenceBackbone, backbone_of
from .base import Reward, RewardError
from .normalize import Calibration, calibrated

FORMAT = "dealign-embedding-reward"
ENSEMBLE_FORMAT = "dealign-ensemble-reward"
CONFIG_FILE = "dealign_reward.json"
HEAD_FILE = "head.safetensors"


class Head(nn.Module):
    """A score from one feature row: ``hidden`` 0 gives a linear score, otherwise one hidden layer with
    GELU and dropout.  ``shift``/``scale`` standardise the rows first (fitted on the training rows for
    LM hidden states, whose dimensions differ in scale by orders of magnitude; 0/1 otherwise)."""

    def __init__(self, in_features: int, hidden: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(in_features))
        self.register_buffer("scale", torch.ones(in_features))
        self.net = (
            nn.Linear(in_features, 1) if hidden == 0
            else nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1))
        )

    def standardise_on(self, rows: torch.Tensor) -> None:
        self.shift.copy_(rows.mean(0))
        self.scale.copy_(rows.std(0) + 1e-4)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net((feats - self.shift) / self.scale).squeeze(-1)


class _FolderModel:
    """What heads and ensembles share: a name, a calibration, and :meth:`reward`."""

    config: dict[str, Any]
    calibration: Calibration | None

    @property
    def name(self) -> str:
        return str(self.config.get("name") or "reward_model")

    def raw_scores(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        raise NotImplementedError

    def reward(self, *, calibrated_scale: bool = True, name: str | None = None, **reward_kw: Any) -> Reward:
        """A ``Reward`` scoring prompt + response: with the stored quantile calibration (default) a
        percentile in [0, 1] against the training responses, else the raw score (unbounded)."""
        raw = Reward(lambda p, c: self.raw_scores(p, c), name or self.name, **reward_kw)
        if calibrated_scale and self.calibration is not None:
            return calibrated(raw, self.calibration)
        return raw

    def _write_config(self, folder: Path, config: dict[str, Any]) -> None:
        if self.calibration is not None:
            config["calibration"] = self.calibration.to_dict()
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1), encoding="utf-8")


class EmbeddingRewardModel(_FolderModel):
    """A trained head on a frozen backbone (sentence embeddings or LM hidden states)."""

    def __init__(self, head: Head, config: dict[str, Any], calibration: Calibration | None = None) -> None:
        self.head = head.eval()
        self.config = config
        self.calibration = calibration

    @property
    def backbone(self) -> SentenceBackbone | LMBackbone:
        spec = self.config.get("backbone")
        return backbone_of(None if spec == SENTENCE_DEFAULT else spec, self.config.get("features"))

    def raw_scores(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """The head's raw score (unbounded) of each (prompt, response)."""
        feats = self.backbone.features(list(prompts), list(responses))
        with torch.inference_mode():
            return self.head(feats).tolist()

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.head.state_dict().items()}, str(folder / HEAD_FILE))
        self._write_config(folder, dict(self.config, format=FORMAT))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "EmbeddingRewardModel":
        from safetensors.torch import load_file

        folder = Path(folder).expanduser()
        config = _read_config(folder, FORMAT)
        if not (folder / HEAD_FILE).is_file():
            raise RewardError(f"{folder} has no {HEAD_FILE}; train it again with `dealign train-reward DATA --out {folder}`")
        try:
            in_features = int(config.get("in_features") or 3 * int(config["dim"]) + 1)  # older folders: MiniLM rows
            head = Head(in_features, int(config["hidden"]), float(config.get("dropout", 0.1)))
            state = load_file(str(folder / HEAD_FILE))
            state.setdefault("shift", torch.zeros(in_features))  # folders saved before heads standardised
            state.setdefault("scale", torch.ones(in_features))
            head.load_state_dict(state)
        except (KeyError, ValueError, RuntimeError, OSError) as exc:
            raise RewardError(f"cannot load the reward folder {folder}: {type(exc).__name__}: {exc}") from exc
        cal = Calibration.from_dict(config["calibration"]) if config.get("calibration") else None
        return cls(head, config, cal)


class EnsembleRewardModel(_FolderModel):
    """A weighted average of standardised member scores: ``sum_i w_i * (raw_i - mean_i) / std_i``, with
    each member's mean and standard deviation on its training responses (from its calibration)."""

    def __init__(self, members: Sequence[tuple[str, EmbeddingRewardModel, float]], config: dict[str, Any],
                 calibration: Calibration | None = None) -> None:
        if not members:
            raise RewardError("an ensemble reward needs at least one member")
        for folder, member, weight in members:
            if member.calibration is None or not member.calibration.std:
                raise RewardError(f"ensemble member {folder!r} has no calibration (mean/std) to standardise it with")
            if weight < 0:
                raise RewardError(f"ensemble member {folder!r} has a negative weight {weight}")
        self.members = list(members)
        self.config = config
        self.calibration = calibration

    def combine(self, member_scores: Sequence[Sequence[float]]) -> list[float]:
        """The ensemble's raw scores from each member's raw scores of the same texts (members in order)."""
        total = [0.0] * len(member_scores[0])
        for (_, member, weight), scores in zip(self.members, member_scores):
            cal = member.calibration
            assert cal is not None  # checked in __init__
            for i, s in enumerate(scores):
                total[i] += weight * (s - cal.mean) / cal.std
        return total

    def raw_scores(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return self.combine([member.raw_scores(prompts, responses) for _, member, _ in self.members])

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / HEAD_FILE).unlink(missing_ok=True)  # a single head saved here before would look like a member
        for sub, member, _ in self.members:
            member.save(folder / sub)
        members = [{"folder": sub, "weight": w} for sub, _, w in self.members]
        self._write_config(folder, dict(self.config, format=ENSEMBLE_FORMAT, members=members))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "EnsembleRewardModel":
        folder = Path(folder).expanduser()
        config = _read_config(folder, ENSEMBLE_FORMAT)
        try:
            members = [(str(m["folder"]), EmbeddingRewardModel.load(folder / str(m["folder"])), float(m["weight"]))
                       for m in config["members"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise RewardError(f"{folder / CONFIG_FILE}: malformed members list ({type(exc).__name__}: {exc})") from exc
        cal = Calibration.from_dict(config["calibration"]) if config.get("calibration") else None
        return cls(members, config, cal)


def _read_config(folder: Path, expected: str | None = None) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise RewardError(f"{folder} is not a dealign reward folder (it needs {CONFIG_FILE}); "
                          "train one with `dealign train-reward DATA --out FOLDER`")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RewardError(f"cannot read {path}: {exc}") from exc
    if expected is not None and config.get("format") != expected:
        raise RewardError(f"{path} has format {config.get('format')!r}, expected {expected!r}")
    return config


def load_reward_folder(folder: str | Path) -> EmbeddingRewardModel | EnsembleRewardModel:
    """A head or an ensemble, by the format its ``dealign_reward.json`` states."""
    config = _read_config(Path(folder).expanduser())
    fmt = config.get("format")
    if fmt == ENSEMBLE_FORMAT:
        return EnsembleRewardModel.load(folder)
    if fmt == FORMAT:
        return EmbeddingRewardModel.load(folder)
    raise RewardError(f"{Path(folder) / CONFIG_FILE} has format {fmt!r}; expected {FORMAT!r} or {ENSEMBLE_FORMAT!r}")


def is_reward_folder(path: str | Path) -> bool:
    return (Path(path).expanduser() / CONFIG_FILE).is_file()
