"""The benchmark on a tiny model: every column is filled, and naive and optimised DeAL agree."""

from __future__ import annotations

import pytest

from dealign.tools.bench import BenchConfig, markdown, run_bench
from dealign.search import SearchConfig


def test_bench_reports_every_configuration_and_checks_equivalence(tiny_model_dir):
    base = SearchConfig(max_new_tokens=6, beam=2, topk=3, lookahead=2)
    configs = [
        BenchConfig("greedy", base.replace(strategy="greedy")),
        BenchConfig("greedy (transformers)", None),
        BenchConfig("deal naive", base, naive=True),
        BenchConfig("deal token", base),
        BenchConfig("deal segment", base.replace(mode="segment")),
    ]
    report = run_bench(str(tiny_model_dir), prompts=3, naive_prompts=2, max_new_tokens=6, configs=configs,
                       progress=lambda m: None)
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == {c.name for c in configs}
    assert rows["deal naive"]["prompts"] == 2 and rows["deal token"]["prompts"] == 3
    assert rows["greedy"]["x_greedy"] == 1.0
    for r in rows.values():
        assert r["seconds_per_prompt"] > 0 and r["forward_passes"] > 0 and r["tokens_processed"] > 0
        assert 0.0 <= r["soft"] <= 1.0 and 0.0 <= r["hard_finished"] <= 1.0
    # the naive reference re-encodes everything: many more forward passes and tokens for the same answer
    assert rows["deal naive"]["tokens_processed"] > rows["deal token"]["tokens_processed"]
    [check] = report["equivalence"]
    assert check["identical_tokens"] is True
    assert check["naive_forward_passes"] > check["optimised_forward_passes"]
    table = markdown(report)
    assert "deal naive" in table and "identical tokens: yes" in table

    # --naive-prompts 0 leaves the slow reference out; bad counts are refused up front
    quick = run_bench(str(tiny_model_dir), prompts=2, naive_prompts=0, max_new_tokens=6, configs=configs,
                      progress=lambda m: None)
    assert "deal naive" not in {r["name"] for r in quick["rows"]} and not quick["equivalence"]
    with pytest.raises(ValueError, match="prompts must be >= 1"):
        run_bench(str(tiny_model_dir), prompts=0, configs=configs, progress=lambda m: None)


def test_bench_remote_rows_next_to_their_local_twins(tiny_model_dir, tiny_model, tiny_tokenizer):
    from fake_vllm import FakeVLLM

    base = SearchConfig(max_new_tokens=6, beam=2, topk=3, lookahead=2)
    configs = [
        BenchConfig("greedy", base.replace(strategy="greedy")),
        BenchConfig("deal segment", base.replace(mode="segment")),
        BenchConfig("remote greedy", base.replace(strategy="greedy"), remote=True),
        BenchConfig("remote deal segment", base.replace(mode="segment"), remote=True),
    ]
    with FakeVLLM(tiny_model, tiny_tokenizer) as engine:
        report = run_bench(str(tiny_model_dir), prompts=2, max_new_tokens=6, configs=configs, progress=lambda m: None,
                           remote=engine.url, remote_dialect="vllm")
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["remote greedy"]["requests"] == 2 and rows["remote deal segment"]["requests"] > 2
    assert rows["greedy"]["x_greedy"] == 1.0  # the local greedy stays the baseline
    checks = {c["remote"]: c for c in report["equivalence"]}
    assert checks["remote greedy"]["identical"] == 2 and checks["remote deal segment"]["identical"] == 2
    assert "identical tokens on 2/2 prompts" in markdown(report)


def test_the_batch_bench_reports_each_size_and_a_model_reward_row(tiny_aligner, monkeypatch):
    """``dealign bench --batch-sizes 1,2 --batch-reward NAME``: every size of every row, answers identical
    to batch size 1's; the model-reward row searches with the named reward (here a tiny stand-in)."""
    import dealign.tools.bench_batch as bb
    from dealign.joint import joint
    from dealign.rewards import Reward

    from conftest import letters

    calls = []

    def rows_fn(rows):
        calls.append(len(rows))
        return letters([p for p, _ in rows], [c for _, c in rows])

    stand_in = Reward(lambda ps, cs: list(joint(("stand-in",), rows_fn, list(zip(ps, cs)))), "stand_in")
    monkeypatch.setattr(bb, "named_reward", lambda name: stand_in)
    report = bb.run_batch_bench(tiny_aligner, prompts=3, batch_sizes=(1, 2), max_new_tokens=4, model_reward="stand_in")
    names = [(r["strategy"], r["batch_size"]) for r in report["rows"]]
    assert names == [(s, b) for s in ("greedy", "deal (default)", "deal + stand_in (segment)") for b in (1, 2)]
    assert all(r["identical"] == 1.0 for r in report["rows"])
    assert calls and "deal + stand_in" in bb.markdown(report)


def test_batch_reward_without_batch_sizes_is_a_clear_error():
    from typer.testing import CliRunner

    from dealign.cli.main import app

    out = CliRunner().invoke(app, ["bench", "--batch-reward", "harmless"])
    assert out.exit_code != 0 and "--batch-reward is for --batch-sizes" in out.output
