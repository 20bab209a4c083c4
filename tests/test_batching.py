"""Batched search across prompts (``backends/lockstep.py``): every strategy's batched answers equal
its one-at-a-time answers token for token, with ragged prompt lengths, rows finishing at different
steps, continuous refill (more prompts than the batch holds), draft model and fluency context; the
forward passes are shared; errors come back in input order; and a batch file resumes."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from typer.testing import CliRunner

from dealign import Aligner
from dealign.backends.hf import HFBackend
from dealign.backends.lockstep import Lockstep
from dealign.cli.main import app

from conftest import SEARCH_CONFIGS, EosBoost, letters  # noqa: E402

# ragged on purpose: 1 to 9 words, so the stacked rows need left padding of different widths
PROMPTS = ["the dog", "a man throws the ball to his dog on the", "children sit", "the cat sleeps on a warm mat",
           "a woman", "players skate on the rink and the team", "dog"]

STRATEGIES = {
    "greedy": dict(strategy="greedy", max_new_tokens=7),
    "sample": dict(strategy="sample", temperature=1.0, max_new_tokens=7, seed=3),
    "best-of-n": dict(strategy="best-of-n", n=3, temperature=1.0, max_new_tokens=6, seed=5),
    "beam": dict(strategy="beam", beam=3, max_new_tokens=6),
    **{f"deal-{name}": dict(dataclass_fields=cfg) for name, cfg in SEARCH_CONFIGS.items()},
    "deal-fluency": dict(strategy="deal", beam=2, topk=3, lookahead=2, lam=2.0, fluency=1.0, max_new_tokens=6),
    "deal-segment-fluency": dict(strategy="deal", mode="segment", beam=2, topk=3, lookahead=2, lam=2.0, fluency=1.0,
                                 max_new_tokens=8),
    "deal-opening": dict(strategy="deal", mode="segment", beam=2, topk=2, lookahead=2, open_tokens=2, open_topk=4,
                         open_lookahead=1, lam=2.0, max_new_tokens=8),
    "deal-sampled-rollouts": dict(strategy="deal", beam=2, topk=3, lookahead=2, rollout_temperature=1.0, seed=7,
                                  lam=2.0, max_new_tokens=6),
}


def _kwargs(spec: dict) -> dict:
    if "dataclass_fields" in spec:
        cfg = spec["dataclass_fields"]
        return {"search": cfg}
    return dict(spec)


@pytest.fixture(scope="module")
def eos_aligner(tiny_model, tiny_tokenizer):
    """The tiny model with end-of-sequence likelier after a few tokens, so rows of one batch finish
    at different steps."""
    boosted = EosBoost(tiny_model, tiny_tokenizer.eos_token_id, 2.0, from_pos=20)
    return Aligner(HFBackend(boosted, tiny_tokenizer, name="tiny-eos"), tiny_tokenizer)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_batched_answers_equal_one_at_a_time(eos_aligner, name):
    kwargs = _kwargs(STRATEGIES[name])
    alone = [eos_aligner.generate(p, reward=letters, **kwargs) for p in PROMPTS]
    before = eos_aligner.backend.counters.forward_passes
    batched = eos_aligner.generate_batch(PROMPTS, batch_size=3, reward=letters, **kwargs)  # 7 prompts: refills
    shared = eos_aligner.backend.counters.forward_passes - before
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert [r.score for r in batched] == pytest.approx([r.score for r in alone], abs=1e-4)
    assert shared < sum(r.stats["forward_passes"] for r in alone)  # the passes were shared
    if name in ("greedy", "sample"):
        assert len({len(r.token_ids) for r in alone}) > 1  # rows of one batch did finish at different steps


def test_batched_with_a_draft_model_equals_one_at_a_time(tiny_model, tiny_draft, tiny_tokenizer):
    al = Aligner.from_model(tiny_model, tiny_tokenizer, draft=(tiny_draft, tiny_tokenizer))
    for mode in ("token", "segment"):
        kw = dict(strategy="deal", mode=mode, beam=2, topk=3, lookahead=2, lam=2.0, fluency=0.0, max_new_tokens=6)
        alone = [al.generate(p, reward=letters, **kw) for p in PROMPTS[:4]]
        batched = al.generate_batch(PROMPTS[:4], batch_size=4, reward=letters, **kw)
        assert [r.token_ids for r in batched] == [r.token_ids for r in alone]


def test_each_prompt_keeps_its_own_settings_and_reward(tiny_aligner):
    """Rows of one batch may differ in strategy, seed and reward; each answer is its own."""
    items = [("the dog", dict(strategy="greedy", max_new_tokens=5)),
             ("a man throws", dict(strategy="sample", temperature=1.0, seed=1, max_new_tokens=5)),
             ("children sit", dict(strategy="deal", beam=2, topk=3, lookahead=1, lam=2.0, max_new_tokens=5)),
             ("the cat", dict(strategy="deal", beam=2, topk=3, lookahead=1, lam=20.0, max_new_tokens=5))]
    alone = [tiny_aligner.generate(p, reward=letters, **kw).token_ids for p, kw in items]
    fn = lambda al, item: al.generate(item[0], reward=letters, **item[1]).token_ids  # noqa: E731
    batched = [r for r, err in tiny_aligner.map_batched(fn, items, batch_size=4)]
    assert batched == alone


def test_a_rollout_group_stacks_the_rows_of_every_search(tiny_aligner):
    lock = Lockstep(4)
    calls = []
    widest = []

    def task(prompt):
        al = tiny_aligner
        view = lock.view(al.backend)
        ids, _ = al.encode_prompt(prompt)
        beam = view.prefill(ids)
        ro = view.rollout(beam, [0, 0], beam.next_logprobs.topk(2).indices.T.contiguous(), 3)
        calls.append(view.counters.forward_passes)
        widest.append(view.counters.rows_max)
        return ro.tokens.shape

    shapes = [r for r, err in lock.map([lambda p=p: task(p) for p in PROMPTS[:4]])]
    assert shapes == [torch.Size([2, 4])] * 4
    assert lock.steps == 2  # one prefill group, one rollout group
    assert widest == [8] * 4  # every search's rows rode in one forward of 4 x 2 rows


def test_a_group_of_calls_with_different_steps_equals_each_alone(eos_aligner):
    """Calls that generate different numbers of tokens, fed or not, share one set of passes (as many
    as the longest) and each gets what it gets alone: tokens, log-probs, lengths, fed count, and the
    beam its commit makes (the rows it rode along with are cropped away)."""
    from dealign.backends.base import RolloutCall, Sampler

    be = eos_aligner.backend
    specs = [(0, False, 0.0), (2, False, 1.0), (3, True, 0.0), (1, True, 1.0), (5, False, 1.0)]

    def calls():
        out = []
        for i, (steps, feed, temp) in enumerate(specs):
            ids, _ = eos_aligner.encode_prompt(PROMPTS[i])
            beam = be.prefill(ids)
            forced = beam.next_logprobs.topk(3).indices.T.contiguous()
            sampler = Sampler(temp, 1.0, torch.Generator().manual_seed(i))
            out.append(RolloutCall(beam, [0, 0, 0], forced, steps, sampler, feed, None))
        return out

    alone = [be.rollout_group([c])[0] for c in calls()]
    grouped = calls()
    before = be.counters.forward_passes
    group = be.rollout_group(grouped)
    assert be.counters.forward_passes - before == max(a.n_fed for a in alone)  # the longest, not the sum
    assert len({a.n_fed for a in alone}) > 2
    for a, g in zip(alone, group):
        assert g.tokens.tolist() == a.tokens.tolist()
        assert g.length == a.length and g.finished == a.finished and g.n_fed == a.n_fed
        assert torch.allclose(g.logprobs, a.logprobs, atol=1e-5)
        for keep in sorted({1, a.n_fed}):
            ca, cg = be.commit(a, [0, 2], keep), be.commit(g, [0, 2], keep)
            assert cg.ids == ca.ids
            assert torch.allclose(cg.next_logprobs, ca.next_logprobs, atol=1e-5)
            assert cg.state.kv.get_seq_length() - (cg.state.pads.min() if cg.state.pads is not None else 0) \
                == ca.state.kv.get_seq_length()
            step_a = be.rollout(ca, [0, 1], ca.next_logprobs.argmax(-1)[:, None], 2)
            step_g = be.rollout(cg, [0, 1], cg.next_logprobs.argmax(-1)[:, None], 2)
            assert step_g.tokens.tolist() == step_a.tokens.tolist()  # the committed cache continues alike


def test_a_long_rollout_runs_apart_from_short_ones_when_rows_cost():
    from dealign.backends.hf import split_by_passes

    calls = [(16, 1), (1, 4), (1, 4), (2, 8), (1, 6)]
    assert split_by_passes(calls, 24.0) == [[1, 2, 3, 4], [0]]  # 16 passes of 37 rows cost more than apart
    assert split_by_passes(calls, 512.0) == [[0, 1, 2, 3, 4]]  # where a pass costs more than the rows
    assert split_by_passes([(3, 4)], 24.0) == [[0]]


# model rewards: their batches join across the searches (dealign.joint) ------------------------------------


def _joint_letters(sizes: list, fail_on: str | None = None):
    """``letters`` computed through ``joint`` the way a model reward computes its rows, recording each
    call's row count; rows whose prompt is ``fail_on`` make the call fail."""
    from dealign.joint import joint
    from dealign.rewards import Reward

    def rows_fn(rows):
        sizes.append(len(rows))
        if fail_on is not None and any(p == fail_on for p, _ in rows):
            raise ValueError(f"cannot score {fail_on!r}")
        return letters([p for p, _ in rows], [c for _, c in rows])

    return Reward(lambda ps, cs: list(joint(("letters", id(sizes)), rows_fn, list(zip(ps, cs)))), "joint_letters")


@pytest.mark.parametrize("mode", ["token", "segment"])
def test_model_reward_batches_grow_with_the_batch_and_answers_do_not_change(eos_aligner, mode):
    kw = dict(strategy="deal", mode=mode, beam=2, topk=3, lookahead=2, lam=2.0, max_new_tokens=6)
    alone_sizes, batched_sizes = [], []
    alone = [eos_aligner.generate(p, reward=_joint_letters(alone_sizes), **kw) for p in PROMPTS]
    batched = eos_aligner.generate_batch(PROMPTS, batch_size=3, reward=_joint_letters(batched_sizes), **kw)
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert max(alone_sizes) <= 2 * 3  # one search scores at most beam x top-k candidates a step
    assert max(batched_sizes) > max(alone_sizes)  # a call held several searches' candidates
    assert len(batched_sizes) < len(alone_sizes)  # in fewer calls


def test_a_sentence_embedding_reward_joins_across_searches(tiny_aligner, tmp_path):
    """A real model reward (MiniLM-style embedder, tiny and random) batched across searches: same
    answers, and the embedder saw rows of several searches in one call."""
    from dealign.rewards import relevance
    from tiny_rewards import build_embedder

    path = build_embedder(tmp_path)
    reward = relevance(model=path)
    kw = dict(strategy="deal", beam=2, topk=3, lookahead=1, lam=5.0, max_new_tokens=5)
    alone = [tiny_aligner.generate(p, reward=reward, **kw) for p in PROMPTS[:4]]
    from dealign.rewards.embedding import embedder

    emb = embedder(path)
    emb.memo.clear()
    sizes = []
    encode = emb.model.encode
    emb.model.encode = lambda texts, **k: (sizes.append(len(texts)), encode(texts, **k))[1]
    try:
        batched = tiny_aligner.generate_batch(PROMPTS[:4], batch_size=4, reward=reward, **kw)
    finally:
        emb.model.encode = encode
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert [r.reward for r in batched] == pytest.approx([r.reward for r in alone], abs=1e-5)
    assert max(sizes) > 2 * 3 + 1  # more texts than one search's candidates and prompt


def test_a_failing_joint_call_fails_only_the_search_it_is_about(tiny_aligner):
    kw = dict(strategy="deal", beam=2, topk=2, lookahead=1, lam=2.0, max_new_tokens=4)
    prompts = ["the dog", "a man", "children sit"]
    alone = [tiny_aligner.generate(p, reward=letters, **kw).token_ids for p in ("the dog", "children sit")]
    sizes = []
    fn = lambda al, p: al.generate(p, reward=_joint_letters(sizes, fail_on="a man"), **kw).token_ids  # noqa: E731
    out = list(tiny_aligner.map_batched(fn, prompts, batch_size=3))
    assert [err is None for _, err in out] == [True, False, True]
    assert "cannot score 'a man'" in str(out[1][1])
    assert [out[0][0], out[2][0]] == alone


def test_errors_come_back_in_input_order_and_the_others_finish(tiny_aligner):
    prompts = ["the dog", "", "a man", "children sit"]  # the empty prompt fails in its own search
    out = list(tiny_aligner.map_batched(lambda al, p: al.generate(p, strategy="greedy", max_new_tokens=4).text,
                                        prompts, batch_size=2))
    assert [err is None for _, err in out] == [True, False, True, True]
    assert "empty" in str(out[1][1])
    with pytest.raises(ValueError, match="empty"):
        tiny_aligner.generate_batch(prompts, batch_size=2, strategy="greedy", max_new_tokens=4)


def test_closing_the_batch_early_leaves_no_search_waiting(tiny_aligner):
    it = tiny_aligner.map_batched(lambda al, p: al.generate(p, strategy="deal", max_new_tokens=6).text,
                                  PROMPTS, batch_size=3)
    next(it)
    it.close()
    for _ in range(50):
        if not [t for t in threading.enumerate() if t.name.startswith("dealign-lockstep")]:
            break
        threading.Event().wait(0.05)
    assert not [t for t in threading.enumerate() if t.name.startswith("dealign-lockstep")]


@pytest.mark.parametrize("bad", [0, -1, 1.5, "4"])
def test_a_bad_batch_size_is_a_clear_error(tiny_aligner, bad):
    with pytest.raises(Exception, match="batch size must be an integer >= 1"):
        tiny_aligner.generate_batch(["the dog"], batch_size=bad)


def test_cli_batch_file_with_batch_size_equals_serial_and_resumes(tiny_model_dir, tmp_path):
    rows = [{"id": i, "prompt": p, "strategy": "deal" if i % 2 else "greedy", "max_new_tokens": 6}
            for i, p in enumerate(PROMPTS)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runner = CliRunner()
    common = ["generate", "--model", str(tiny_model_dir), "--input", str(src)]
    res = runner.invoke(app, [*common, "--output", str(tmp_path / "serial.jsonl")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, [*common, "--output", str(tmp_path / "batched.jsonl"), "--batch-size", "3"])
    assert res.exit_code == 0, res.output
    read = lambda f: [json.loads(line) for line in (tmp_path / f).read_text().splitlines()]  # noqa: E731
    serial, batched = read("serial.jsonl"), read("batched.jsonl")
    assert [r["id"] for r in batched] == list(range(len(PROMPTS)))  # input order
    assert [r["text"] for r in batched] == [r["text"] for r in serial]
    # interrupted after 3 rows: --resume answers the rest, same rows as an uninterrupted run
    (tmp_path / "partial.jsonl").write_text("".join(json.dumps(r) + "\n" for r in batched[:3]))
    res = runner.invoke(app, [*common, "--output", str(tmp_path / "partial.jsonl"), "--batch-size", "3", "--resume"])
    assert res.exit_code == 0, res.output
    assert [r["text"] for r in read("partial.jsonl")] == [r["text"] for r in serial]
    res = runner.invoke(app, [*common, "--output", str(tmp_path / "x.jsonl"), "--batch-size", "0"])
    assert res.exit_code != 0 and "batch size must be an integer >= 1" in res.output
