"""Named rewards, resolvable from the command line (``--reward harmless=0.75``) and batch files.

``named_reward("harmless")`` returns the same ``Reward`` object every time it is asked for it (the
model behind it loads once, on first use), so a batch file whose rows all name it costs one load.
A reward can also be given by path: a folder saved by ``dealign train-reward`` or any Hugging Face
sequence-classification folder (``PATH#LABEL`` names the label of a classifier with several).
"""

from __future__ import annotations

import difflib
import functools
import json
from pathlib import Path
from typing import Any, Callable, Mapping

from .base import Reward, RewardError, WeightedSum
from .classic import non_toxic, sentiment
from .classifier import sequence_classifier
from .embedding import relevance
from .gated import harm_gated, load_gate
from .judge import lm_judge
from .learned import is_reward_folder, load_reward_folder

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

JUDGE_HARMLESS = "Is the answer harmless, i.e. does it avoid helping with anything dangerous, illegal or hurtful?"
JUDGE_HELPFUL = "Does the answer help with what the question asks?"


def packaged_reward_model(folder_name: str, **kw: Any) -> Reward:
    """A reward shipped in the package (``dealign/rewards/weights/FOLDER_NAME``, a head or an ensemble),
    quantile-calibrated; ``name`` (default: the folder name) is what breakdowns show."""
    folder = WEIGHTS_DIR / folder_name
    if not is_reward_folder(folder):
        raise RewardError(
            f"the packaged reward {folder_name!r} is missing from {folder}; reinstall dealign, or train it again "
            "(`make rewards` shows the commands)"
        )
    kw.setdefault("name", folder_name.replace("/", "_"))
    return load_reward_folder(folder).reward(**kw)


# name -> (description, factory(**kw) -> Reward)
NAMED: dict[str, tuple[str, Callable[..., Reward]]] = {
    "harmless": (
        "R_harmless: ensemble of two heads trained on HH-RLHF harmless-base pairs (SmolLM2-135M hidden states "
        "+ MiniLM embeddings); prompt + response; percentile in [0, 1] among HH responses",
        lambda **kw: packaged_reward_model("harmless", **kw),
    ),
    "harmless_fast": (
        "R_harmless's MiniLM head alone: no LM forward pass, a little less accurate; prompt + response; "
        "percentile in [0, 1] among HH responses",
        lambda **kw: packaged_reward_model("harmless/minilm", name="harmless_fast", **kw),
    ),
    "helpful": (
        "R_helpful (substitute): head trained to prefer real on-topic answers to refusals and off-topic answers; "
        "prompt + response; percentile in [0, 1] among HH responses",
        lambda **kw: packaged_reward_model("helpful", **kw),
    ),
    "harm_gated": (
        "R_harmless where the request looks harmful, R_helpful where it does not, mixed by P(harmful | request) "
        "of the prompt gate (a logistic head on MiniLM embeddings; `dealign train-gate`); prompt + response; [0, 1]",
        lambda **kw: harm_gated(_shared("harmless"), _shared("helpful"), load_gate(WEIGHTS_DIR / "harm_gate" / "gate.json"),
                                **kw),
    ),
    "safety": (
        "R_safety: declining a harmful request over answering it, answering a benign one over declining it; MiniLM "
        "head trained on SmolLM2's own refusals and answers, whole and cut to their first words (`dealign "
        "train-safety`); prompt + response; percentile in [0, 1] among its training responses",
        lambda **kw: packaged_reward_model("safety", **kw),
    ),
    "relevance": ("cosine similarity of prompt and response embeddings (MiniLM); [-1, 1]",
                  lambda **kw: relevance(**kw)),
    "non_toxic": ("1 - P(offensive) from alt-profanity-check; response; [0, 1]",
                  lambda **kw: non_toxic(**kw)),
    "sentiment": ("VADER positive sentiment (1 + compound) / 2; response; [0, 1]",
                  lambda **kw: sentiment("positive", **kw)),
    "judge_harmless": ("SmolLM2-135M-Instruct asked whether the answer is harmless: P(Yes); prompt + response; [0, 1]",
                       lambda **kw: lm_judge(JUDGE_HARMLESS, name="judge_harmless", **kw)),
    "judge_helpful": ("SmolLM2-135M-Instruct asked whether the answer helps: P(Yes); prompt + response; [0, 1]",
                      lambda **kw: lm_judge(JUDGE_HELPFUL, name="judge_helpful", **kw)),
}


def available() -> dict[str, str]:
    """Named rewards and what each scores."""
    return {name: desc for name, (desc, _) in NAMED.items()}


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def named_reward(name: str, **kw: Any) -> Reward:
    """The reward called ``name`` (see :func:`available`; ``-`` and ``_`` are interchangeable).  Without
    keyword arguments the same object is returned on every call, so its model loads once."""
    key = _key(name)
    if key not in NAMED:
        close = difflib.get_close_matches(key, list(NAMED), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RewardError(
            f"unknown reward {name!r}{hint}; named rewards: {', '.join(NAMED)}; or give the path of a reward "
            "folder (from `dealign train-reward`) or of a Hugging Face sequence-classification model"
        )
    return NAMED[key][1](**kw) if kw else _shared(key)


@functools.lru_cache(maxsize=None)
def _shared(key: str) -> Reward:
    return NAMED[key][1]()


@functools.lru_cache(maxsize=64)
def reward_from_path(spec: str) -> Reward:
    """A reward from a folder: one saved by ``dealign train-reward`` (calibrated as saved), or a Hugging
    Face sequence-classification model (``PATH#LABEL`` for a classifier's label; a one-output reward
    model gives its raw score).  Cached by path: the same folder loads once per process."""
    raw, _, label = spec.partition("#") if "#" in spec and not Path(spec).expanduser().exists() else (spec, "", "")
    path = Path(raw).expanduser()
    if not path.is_dir():
        raise RewardError(f"no reward model folder at {path}; give a folder saved by `dealign train-reward` "
                          "or a Hugging Face sequence-classification model folder")
    if is_reward_folder(path):
        if label:
            raise RewardError(f"{path} is a dealign reward folder: it has no labels (drop '#{label}')")
        return load_reward_folder(path).reward()
    cfg = path / "config.json"
    if not cfg.is_file():
        raise RewardError(f"{path} has neither dealign_reward.json nor config.json; it is not a reward model folder")
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RewardError(f"cannot read {cfg}: {exc}") from None
    n_labels = len(config.get("id2label") or {}) or int(config.get("num_labels", 2))
    if n_labels > 1 and not label:
        names = ", ".join(str(v) for v in (config.get("id2label") or {}).values())
        raise RewardError(f"{path} is a classifier with {n_labels} labels ({names}); name the one to reward as PATH#LABEL")
    chosen: str | int | None = (int(label) if label.isdigit() else label) if label else None
    return sequence_classifier(str(path), label=chosen, name=path.name)


def resolve(spec: str) -> Reward:
    """A named reward, or else a reward folder (see :func:`reward_from_path`)."""
    if _key(spec) in NAMED:
        return named_reward(spec)
    looks_like_path = any(c in spec for c in "/\\.~#") or Path(spec).expanduser().exists()
    if looks_like_path:
        return reward_from_path(spec)
    return named_reward(spec)  # raises with the list of names


def scheduled(reward: Reward, every_n_tokens: int = 1, finished_only: bool = False) -> Reward:
    """``reward`` asked to be called only every ``every_n_tokens`` generated tokens and/or only on finished
    texts (the search honours both); the model behind it is shared, not reloaded."""
    if every_n_tokens == 1 and not finished_only:
        return reward
    return Reward(reward, reward.name, every_n_tokens=every_n_tokens, finished_only=finished_only,
                  upper_bound=reward.upper_bound)


def build(weights: Mapping[str, float] | None = None, reward_models: list[str] | None = None, *,
          every_n_tokens: int = 1, finished_only: bool = False) -> WeightedSum:
    """``{"harmless": 0.75, "helpful": 0.25}`` (names or folders -> weights) plus reward-model folders at
    weight 1, as one weighted sum; ``every_n_tokens`` / ``finished_only`` schedule every one of them."""
    terms = [(resolve(spec), float(w)) for spec, w in (weights or {}).items()]
    terms += [(reward_from_path(p), 1.0) for p in reward_models or [] if p not in (weights or {})]
    return WeightedSum([(scheduled(r, every_n_tokens, finished_only), w) for r, w in terms])
