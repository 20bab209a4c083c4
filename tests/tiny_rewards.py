"""Tiny random-weight models for the reward tests, built from a config and saved as folders the way a
user's models arrive: a sentence-transformers embedder (a 2-layer BERT with a word-level vocabulary)
and sequence classifiers on the shared tiny BPE tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import CORPUS, build_tokenizer

WORDS = sorted({w for line in CORPUS for w in line.split()} | {
    "good", "great", "kind", "safe", "help", "bad", "awful", "hurt", "harm", "sorry", "no", "yes", "how", "do", "i",
    "can", "you", "it", "is", "what", "why", "make", "a", "an", "the",
})


def build_embedder(folder: Path, seed: int = 0) -> Path:
    """A sentence-transformers folder: tiny BERT (hidden 32) + mean pooling, random weights."""
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer import modules as models
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers import models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    bert_dir = folder / "bert"
    bert_dir.mkdir(parents=True, exist_ok=True)
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    core = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    tok = BertTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(bert_dir)
    tok.save_pretrained(bert_dir)
    word = models.Transformer(str(bert_dir), max_seq_length=64)
    dim = getattr(word, "get_embedding_dimension", None) or word.get_word_embedding_dimension
    pool = models.Pooling(dim(), "mean")
    out = folder / "embedder"
    SentenceTransformer(modules=[word, pool], device="cpu").save(str(out))
    return out


def build_classifier(folder: Path, num_labels: int, seed: int = 0, chat_template: bool = True) -> Path:
    """A Llama sequence classifier on the tiny BPE tokenizer; ``num_labels`` 1 is a reward model."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = build_tokenizer()
    if not chat_template:
        tok.chat_template = None
    torch.manual_seed(seed)
    labels = {0: "neg", 1: "pos", 2: "other"}
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, num_labels=num_labels,
                      id2label={i: labels[i] for i in range(num_labels)}, label2id={labels[i]: i for i in range(num_labels)})
    model = LlamaForSequenceClassification(cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
