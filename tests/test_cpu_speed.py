"""CPU speed settings that must not change what a model computes: the input-major weight layout
(``models/layout.py``) and which threads own the OpenMP cores (``backends/cpu_threads.py``)."""

from __future__ import annotations

import threading

import pytest
import torch

from dealign.backends.cpu_threads import _libgomp, release_team, serial_thread
from dealign.errors import UsageError
from dealign.models.layout import ENV, apply_chosen_layout, input_major
from dealign.models.loading import load

from conftest import build_model


def _linears(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


def test_input_major_keeps_shapes_ties_and_logits(tiny_tokenizer):
    model = build_model(tiny_tokenizer, seed=3)
    model.lm_head.weight = model.model.embed_tokens.weight  # tie, as SmolLM2 and Gemma do
    ids = torch.tensor([tiny_tokenizer.encode("the dog catches a ball in the park")] * 3)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    changed = input_major(model)
    assert changed == len(_linears(model))  # the tied head once, with every other Linear
    for lin in _linears(model):
        out, inp = lin.weight.shape
        assert lin.weight.stride() == (1, out)  # the same [out, in] tensor, stored [in, out]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    assert input_major(model) == 0  # a second call finds nothing left to change


def test_layout_is_applied_on_load_unless_asked_not_to(tiny_model_dir, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert all(lin.weight.stride()[0] == 1 for lin in _linears(load(str(tiny_model_dir)).model))
    monkeypatch.setenv(ENV, "as-loaded")
    assert all(lin.weight.is_contiguous() for lin in _linears(load(str(tiny_model_dir)).model))
    assert all(lin.weight.is_contiguous() for lin in _linears(load(str(tiny_model_dir), dtype="bfloat16").model))


def test_an_unknown_layout_is_a_one_line_error(tiny_tokenizer, monkeypatch):
    monkeypatch.setenv(ENV, "column-major")
    with pytest.raises(UsageError, match="DEALIGN_WEIGHT_LAYOUT must be one of input-major, as-loaded"):
        apply_chosen_layout(build_model(tiny_tokenizer))


def test_a_serial_thread_leaves_the_other_threads_their_cores():
    threads_before = torch.get_num_threads()
    seen = {}

    def search_thread():
        serial_thread()
        seen["inside"] = torch.get_num_threads()
        torch.randn(64, 4096).topk(4, dim=-1)  # an op big enough to go parallel, run on one core
        seen["ok"] = True

    worker = threading.Thread(target=search_thread)
    worker.start()
    worker.join()
    assert seen == {"inside": 1 if _libgomp() is not None else threads_before, "ok": True}
    assert torch.get_num_threads() == threads_before  # the calling thread keeps its width
    release_team()  # lets this thread's workers go; torch brings them back at its next parallel op
    assert torch.randn(64, 4096).sum().isfinite()
    assert torch.get_num_threads() == threads_before


def test_the_cpu_step_suite_reports_both_tables(tiny_model_dir):
    from dealign.tools.cpu_step import markdown, run_cpu_step

    report = run_cpu_step(str(tiny_model_dir), rows=(1, 4), repeats=2, context=8, thread_rows=4)
    assert [r["rows"] for r in report["layout"]] == [1, 4]
    assert all(r["as-loaded ms"] > 0 and r["input-major ms"] > 0 and r["speed-up"] > 0 for r in report["layout"])
    assert [r["setting"] for r in report["threads"]][-1] == "searches serial, loading thread's team released"
    assert all(r["ms"] > 0 and r["cpu_use"] > 0 for r in report["threads"])
    text = markdown(report)
    assert "| rows | as-loaded ms | input-major ms | speed-up |" in text and "cpu_use" in text
