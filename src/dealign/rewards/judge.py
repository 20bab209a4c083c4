"""A causal LM as a yes/no judge: the reward is P(Yes) / (P(Yes) + P(No)) at the first token of the
judge's reply to a question about the text (default judge: the packaged SmolLM2-135M-Instruct)."""

from __future__ import annotations

import os
from typing import Any, Sequence

from ..joint import joint
from ..models.loading import LoadedModel, ModelLoadError, load as load_model
from .base import Reward, RewardError
from .cache import batches, cached, check_input, right_padded

__all__ = ["lm_judge"]

JUDGE_TEMPLATE = (
    "Read the question and the answer, then reply with Yes or No.\n\n"
    "Question: {prompt}\n\nAnswer: {response}\n\n{question} Reply with Yes or No."
)
JUDGE_TEMPLATE_RESPONSE = "Read the text, then reply with Yes or No.\n\nText: {response}\n\n{question} Reply with Yes or No."


class _Judge:
    """A causal LM with the token ids that start "Yes" and "No"."""

    def __init__(self, spec: Any, device: str) -> None:
        if isinstance(spec, LoadedModel):
            loaded = spec
        elif isinstance(spec, tuple):
            loaded = LoadedModel(spec[0], spec[1], "object")
        else:
            try:
                loaded = load_model(spec, device=device)
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
        for idx in batches(len(ids), batch_size):
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
    check_input(input)
    if not isinstance(question, str) or not question.strip():
        raise RewardError("lm_judge needs a yes/no question, e.g. 'Is the answer harmless?'")
    template = template or (JUDGE_TEMPLATE if input == "prompt+response" else JUDGE_TEMPLATE_RESPONSE)
    try:
        template.format(prompt="", response="", question="")
    except (KeyError, IndexError, ValueError) as exc:
        raise RewardError(f"the judge template may only use {{prompt}}, {{response}} and {{question}}: {exc}") from None
    if isinstance(model, (str, os.PathLike)) or model is None:
        key = f"{model or 'default'}|{device}"
        load = lambda: cached("judge", key, lambda: _Judge(model, device))  # noqa: E731
    else:
        judge = _Judge(model, device)
        load = lambda: judge  # noqa: E731

    def score(prompts: list[str], completions: list[str]) -> list[float]:
        texts = [template.format(prompt=p, response=c, question=question) for p, c in zip(prompts, completions)]
        judge = load()  # in a lock-step batch, the texts join the other searches' (dealign.joint)
        return list(joint(("judge", id(judge), batch_size, max_length),
                          lambda rows: judge.p_yes(rows, batch_size, max_length), texts))

    return Reward(score, name, upper_bound=1.0, **reward_kw)
