"""Shared fixtures: tiny random-weight causal LMs built from a config, with a tokenizer trained on
the spot, saved to a folder so every entry point (API, CLI) loads them like a user's model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dealign.search import SearchConfig

CORPUS = [
    "the dog catches a red frisbee in the park",
    "a man throws the ball to his dog on the beach",
    "children sit on a bench and eat ice cream",
    "the cat sleeps on a warm mat near the window",
    "a woman rides a bike along the river at sunset",
    "players skate on the rink and the team scores a goal",
] * 4

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=320, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(tokenizer, seed: int = 0, layers: int = 2, hidden: int = 48):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper distributions than the default init, so greedy is not a coin toss
        model.lm_head.weight.mul_(8.0)
    return model


class EosBoost(torch.nn.Module):
    """Wraps a causal LM and adds ``boost`` to the end-of-sequence logit at chosen positions: those
    predicting absolute position >= ``from_pos`` and/or those right after ``after_token``."""

    def __init__(self, inner, eos: int, boost: float, *, from_pos: int | None = None, after_token: int | None = None):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.generation_config = inner.generation_config
        self.eos, self.boost, self.from_pos, self.after_token = eos, boost, from_pos, after_token

    def forward(self, input_ids=None, cache=None, use_cache=None, **kwargs):
        past = cache.get_seq_length() if cache is not None else 0
        out = self.inner(input_ids=input_ids, cache=cache, use_cache=use_cache, **kwargs)
        mask = torch.ones(input_ids.shape, dtype=torch.bool)
        if self.from_pos is not None:
            pos = past + torch.arange(input_ids.shape[1])
            mask &= (pos + 1 >= self.from_pos)[None, :]
        if self.after_token is not None:
            mask &= input_ids.cpu() == self.after_token
        out.logits[..., self.eos] += self.boost * mask.to(out.logits.dtype)
        return out


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    return build_model(tiny_tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_draft(tiny_tokenizer):
    return build_model(tiny_tokenizer, seed=1, layers=1, hidden=32)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model, tiny_tokenizer) -> Path:
    """The tiny model saved as a Hugging Face folder, as a user would pass with --model."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_aligner(tiny_model, tiny_tokenizer):
    from dealign import Aligner

    return Aligner.from_model(tiny_model, tiny_tokenizer, name="tiny")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Keep test conversions out of the user's cache unless DEALIGN_CACHE is set by the caller."""
    if "DEALIGN_CACHE" not in os.environ:
        os.environ["DEALIGN_CACHE"] = str(Path.home() / ".cache" / "dealign")
    torch.set_num_threads(1)  # tiny models: threads only add overhead (integration tests set their own)
    yield


PROMPT = "the dog catches a"

# DeAL settings that exercise every path of the search (token/segment, lookahead 0-3, top-p, length
# penalty, no early stop): backends are compared on all of them
SEARCH_CONFIGS = {
    "token-L0": SearchConfig(mode="token", beam=2, topk=3, lookahead=0, lam=2.0, max_new_tokens=6),
    "token-L1": SearchConfig(mode="token", beam=2, topk=3, lookahead=1, lam=2.0, max_new_tokens=6),
    "token-L3": SearchConfig(mode="token", beam=3, topk=3, lookahead=3, lam=2.0, max_new_tokens=6),
    "segment-L1": SearchConfig(mode="segment", beam=2, topk=3, lookahead=1, lam=2.0, max_new_tokens=8),
    "segment-L3": SearchConfig(mode="segment", beam=2, topk=4, lookahead=3, lam=2.0, max_new_tokens=9),
    "top_p": SearchConfig(mode="token", beam=2, topk=6, top_p=0.05, lookahead=2, lam=2.0, max_new_tokens=6),
    "length_penalty": SearchConfig(mode="token", beam=2, topk=3, lookahead=2, lam=0.5, length_penalty=1.0, max_new_tokens=6),
    "segment-length_penalty": SearchConfig(mode="segment", beam=2, topk=3, lookahead=2, lam=0.5, length_penalty=0.7, max_new_tokens=8),
    "no-early-stop": SearchConfig(mode="token", beam=3, topk=2, lookahead=2, lam=1.0, early_stop=False, max_new_tokens=6),
}


def letters(prompts, completions):
    """A graded reward: the share of plain letters and spaces in the text (0 for an empty text)."""
    return [sum(c.isalpha() or c == " " for c in t) / len(t) if t else 0.0 for t in completions]


@pytest.fixture(scope="module")
def prompt_ids(tiny_tokenizer):
    return tiny_tokenizer.encode(PROMPT)
