"""Hugging Face sequence classifiers and reward models (``AutoModelForSequenceClassification``) as
batched rewards.  Nothing is downloaded: a model is a local folder or a hub id already in the local
Hugging Face cache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from ..joint import joint
from .base import Reward, RewardError
from .cache import batches, cached, check_input

__all__ = ["sequence_classifier"]


def _local_model(spec: str | os.PathLike) -> tuple[str, dict]:
    """A model argument -> (where, from_pretrained kwargs): a folder as is, a hub id offline only."""
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists():
            raise RewardError(f"{path} is a folder without config.json; give a Hugging Face model folder")
        return str(path), {}
    raw = str(spec)
    if raw.startswith((".", "~", "/")) or (os.sep in raw and raw.count("/") != 1):
        raise RewardError(f"no model folder at {path}; give an existing Hugging Face model folder")
    return raw, {"local_files_only": True}  # a hub id: only if it is in the local Hugging Face cache


class _Classifier:
    """A loaded ``AutoModelForSequenceClassification`` with its own tokenizer."""

    def __init__(self, spec: Any, device: str, tokenizer: Any = None) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if isinstance(spec, (str, os.PathLike)):
            where, kw = _local_model(spec)
            try:
                self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(where, **kw)
                self.model = AutoModelForSequenceClassification.from_pretrained(where, dtype=torch.float32, **kw)
            except (OSError, ValueError) as exc:
                raise RewardError(
                    f"could not load a sequence-classification model from {where!r} (a local folder, or a hub id "
                    f"already in the local Hugging Face cache; nothing is downloaded): {type(exc).__name__}: {exc}"
                ) from exc
        else:
            if tokenizer is None:
                raise RewardError("pass tokenizer= together with a model object")
            self.model, self.tokenizer = spec, tokenizer
        self.model = self.model.to(device).eval()
        self.device = device
        if self.tokenizer.pad_token_id is None:
            if self.tokenizer.eos_token_id is None:
                raise RewardError("the reward model's tokenizer has neither a pad nor an end-of-sequence token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if getattr(self.model.config, "pad_token_id", None) is None:  # decoder models find the last token by it
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.num_labels = int(self.model.config.num_labels)
        self.labels = {int(i): str(n) for i, n in (self.model.config.id2label or {}).items()}

    def label_index(self, label: str | int | None) -> int | None:
        if self.num_labels == 1:
            return None
        names = ", ".join(f"{i}={n!r}" for i, n in sorted(self.labels.items()))
        if label is None:
            raise RewardError(f"this classifier has {self.num_labels} labels ({names}); name the one to reward with label=")
        if isinstance(label, int) and not isinstance(label, bool):
            if not 0 <= label < self.num_labels:
                raise RewardError(f"label index {label} is out of range; labels: {names}")
            return label
        for i, n in self.labels.items():
            if n.lower() == str(label).lower():
                return i
        raise RewardError(f"unknown label {label!r}; this classifier's labels are {names}")

    def texts(self, prompts: Sequence[str], completions: Sequence[str], input: str):
        """Encoder inputs: the model's chat template when it has one, else a (prompt, response) pair."""
        tok = self.tokenizer
        if input == "response":
            return list(completions), None
        if getattr(tok, "chat_template", None):
            return [
                tok.apply_chat_template(
                    [{"role": "user", "content": p}, {"role": "assistant", "content": c}], tokenize=False
                )
                for p, c in zip(prompts, completions)
            ], None
        return list(prompts), list(completions)

    def logits(self, prompts, completions, input: str, batch_size: int, max_length: int):
        import torch

        first, second = self.texts(prompts, completions, input)
        templated = second is None and input != "response"
        tok = self.tokenizer
        size = [len(first[i]) + (len(second[i]) if second is not None else 0) for i in range(len(first))]
        order = sorted(range(len(first)), key=size.__getitem__)  # similar lengths share a batch: little padding
        out = torch.zeros(len(first), self.num_labels)
        old_side = tok.truncation_side
        tok.truncation_side = "left"  # a long dialogue loses its start, never the response being judged
        try:
            for idx in batches(len(first), batch_size):
                rows = [order[i] for i in idx]
                kw = dict(padding=True, truncation=True, max_length=max_length, return_tensors="pt")
                if templated:
                    kw["add_special_tokens"] = False  # the template already holds them
                args = [[first[i] for i in rows]] + ([[second[i] for i in rows]] if second is not None else [])
                enc = tok(*args, **kw).to(self.device)
                with torch.inference_mode():
                    out[rows] = self.model(**enc).logits.float().cpu()
        finally:
            tok.truncation_side = old_side
        return out


def sequence_classifier(
    model: Any,
    *,
    label: str | int | None = None,
    output: str = "prob",
    input: str = "prompt+response",
    tokenizer: Any = None,
    batch_size: int = 16,
    max_length: int = 512,
    device: str = "cpu",
    name: str | None = None,
    **reward_kw: Any,
) -> Reward:
    """A Hugging Face ``AutoModelForSequenceClassification`` (folder, cached hub id, or model object with
    ``tokenizer=``) as a reward.

    *Scores* the prompt + response (``input="prompt+response"``, the default: formatted with the reward
    model's **own** chat template when its tokenizer has one, else encoded as a text pair) or the response
    alone (``input="response"``).  Long inputs are truncated from the left to ``max_length`` tokens, so
    the response is kept; texts go through the model ``batch_size`` at a time.

    *Range*: a reward model with one output gives its raw score (unbounded; put it on a common scale with
    :mod:`dealign.rewards.normalize`).  A classifier with several labels gives, for the ``label`` you name
    (its name in ``config.id2label`` or its index), ``output="prob"`` in [0, 1], ``"logprob"`` in
    (-inf, 0] or ``"logit"`` (unbounded).  ``reward_kw``: ``every_n_tokens``, ``finished_only``.
    """
    check_input(input)
    if output not in ("prob", "logprob", "logit"):
        raise RewardError(f"output must be prob, logprob or logit; got {output!r}")
    if isinstance(model, (str, os.PathLike)):
        key = f"{Path(model).expanduser().resolve() if Path(model).expanduser().exists() else model}|{device}"
        _local_model(model)  # a wrong path fails now, not at the first search step
        load = lambda: cached("classifier", key, lambda: _Classifier(model, device))  # noqa: E731
        label_name = str(Path(str(model)).name)
    else:
        clf = _Classifier(model, device, tokenizer)
        load = lambda: clf  # noqa: E731
        label_name = type(model).__name__

    def score(prompts: list[str], completions: list[str]) -> list[float]:
        import torch

        clf = load()
        idx = clf.label_index(label)
        # in a lock-step batch, the rows join the other searches' of the same classifier (dealign.joint)
        logits = joint(("classifier", id(clf), input, batch_size, max_length),
                       lambda rows: clf.logits([p for p, _ in rows], [c for _, c in rows], input, batch_size, max_length),
                       list(zip(prompts, completions)))
        if idx is None:
            return logits[:, 0].tolist()
        if output == "logit":
            return logits[:, idx].tolist()
        lp = torch.log_softmax(logits, -1)[:, idx]
        return (lp.exp() if output == "prob" else lp).tolist()

    bound = {"prob": 1.0, "logprob": 0.0}.get(output) if label is not None else None
    return Reward(score, name or label_name, upper_bound=bound, **reward_kw)
