"""Hard constraints inside the search (dealign.constraints): every strategy under every constraint
kind returns an answer that parses, matcher states follow their rows, batched == one at a time, and
bad constraints fail in one line before any model work."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from dealign import Aligner, constraints as C
from dealign.backends.hf import HFBackend, NaiveHFBackend
from dealign.constraints.matcher import attach, grammar_for
from dealign.search import SearchConfig, run_search

from conftest import SEARCH_CONFIGS, letters

SCHEMA = {
    "type": "object",
    "properties": {"animal": {"enum": ["dog", "cat"]}, "count": {"type": "integer", "minimum": 0, "maximum": 9},
                   "ok": {"type": "boolean"}},
    "required": ["animal", "count", "ok"],
    "additionalProperties": False,
}
PATTERN = r"(dog|cat) [a-z]{1,4}"
CHOICES = ["the dog", "a cat", "frisbee"]
LARK = 'start: "the " NOUN " " VERB\nNOUN: "dog" | "cat" | "park"\nVERB: "runs" | "sleeps"'


def _valid_json(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


CASES = {
    "json_schema": (lambda: C.json_schema(SCHEMA), _valid_json),
    "regex": (lambda: C.regex(PATTERN), lambda t: re.fullmatch(PATTERN, t) is not None),
    "choice": (lambda: C.choice(CHOICES), lambda t: t in CHOICES),
    "grammar": (lambda: C.grammar(LARK), lambda t: re.fullmatch(r"the (dog|cat|park) (runs|sleeps)", t) is not None),
    "gbnf": (lambda: C.grammar('root ::= "yes" | "no" | "maybe"'), lambda t: t in ("yes", "no", "maybe")),
}
STRATEGIES = {
    "greedy": SearchConfig(strategy="greedy"),
    "sample": SearchConfig(strategy="sample", temperature=1.5, seed=3),
    "best-of-n": SearchConfig(strategy="best-of-n", n=3, temperature=1.5),
    "beam": SearchConfig(strategy="beam", beam=3),
    **{f"deal-{k}": v for k, v in SEARCH_CONFIGS.items()},
}


@pytest.fixture(scope="module")
def backend(tiny_model, tiny_tokenizer):
    return HFBackend(tiny_model, tiny_tokenizer, name="tiny")


@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_returns_an_answer_that_parses(backend, prompt_ids, kind, strategy):
    make, valid = CASES[kind]
    cfg = STRATEGIES[strategy].replace(max_new_tokens=48)
    result = run_search(backend, prompt_ids, letters, cfg, constraint=make())
    assert result.best.finished, result.best.text
    assert valid(result.best.text), result.best.text
    for hyp in result.beam:  # every finished state of the final beam matches too
        if hyp.finished:
            assert valid(hyp.text), hyp.text


@pytest.mark.parametrize("segment", [False, True])
def test_the_draft_model_rolls_out_under_the_constraint(tiny_model, tiny_draft, tiny_tokenizer, prompt_ids, segment):
    policy, draft = HFBackend(tiny_model, tiny_tokenizer), HFBackend(tiny_draft, tiny_tokenizer, name="draft")
    cfg = SearchConfig(mode="segment" if segment else "token", beam=2, topk=3, lookahead=2, lam=2.0, max_new_tokens=48)
    result = run_search(policy, prompt_ids, letters, cfg, draft=draft, constraint=C.json_schema(SCHEMA))
    assert result.best.finished and _valid_json(result.best.text), result.best.text


def test_the_answer_differs_from_the_unconstrained_one_and_eos_waits_for_the_grammar(backend, prompt_ids):
    free = run_search(backend, prompt_ids, None, SearchConfig(strategy="greedy", max_new_tokens=12))
    assert not _valid_json(free.best.text)
    fmt = C.json_schema(SCHEMA)
    beam = attach(backend, backend.prefill(prompt_ids), fmt)
    allowed = torch.isfinite(beam.next_logprobs[0])
    assert allowed.sum() == 1 and backend.tokenizer.decode([int(allowed.nonzero())]) == "{"
    assert not bool(allowed[list(backend.eos_ids)].any())  # nothing is complete yet
    assert abs(float(beam.next_logprobs[0].logsumexp(-1))) < 1e-5  # renormalised over the allowed tokens


def test_forked_matcher_states_never_leak_between_rows(backend, prompt_ids):
    """After every DeAL step each beam row's matcher is exactly a fresh matcher fed that row's own
    answer tokens: the forks of a rollout and the rollback of a commit keep rows apart."""
    fmt = C.json_schema(SCHEMA)
    grammar = grammar_for(backend, fmt)
    seen = []
    real_commit = backend.commit

    def checked_commit(rollout, rows, keep):
        beam = real_commit(rollout, rows, keep)
        answers = [ids[len(prompt_ids):] for ids in beam.ids]
        for row, answer in enumerate(answers):
            fresh = grammar.start()
            for token in answer:
                fresh.advance(torch.tensor([token]))
            assert torch.equal(grammar.allowed([beam.constraint.rows[row]]), grammar.allowed([fresh.rows[0]])), answer
        seen.append(len(set(map(tuple, answers))))
        return beam

    backend.commit = checked_commit
    try:
        for cfg in (SEARCH_CONFIGS["token-L3"], SEARCH_CONFIGS["segment-L3"]):
            run_search(backend, prompt_ids, letters, cfg.replace(max_new_tokens=20), constraint=fmt)
    finally:
        del backend.commit
    assert seen and max(seen) > 1  # rows did differ


def test_row_states_fork_and_advance_independently(backend):
    grammar = grammar_for(backend, C.choice(CHOICES))
    tok = backend.tokenizer
    states = grammar.start().fork([0, 0])
    first = tok.encode("the dog")[0], tok.encode("a cat")[0]
    states.advance(torch.tensor(first))
    a, b = grammar.allowed(states.rows)
    assert not torch.equal(a, b)
    again = states.fork([1, 1, 0])
    again.advance(torch.tensor([tok.encode("a cat")[1], tok.encode("a cat")[1], tok.encode("the dog")[1]]))
    assert again.consumed == [1, 1, 1] and states.consumed == [1, 1]  # the parents are untouched


@pytest.mark.parametrize("cfg", [SearchConfig(strategy="greedy"), SearchConfig(strategy="best-of-n", n=3),
                                 SearchConfig(strategy="beam", beam=2), SEARCH_CONFIGS["token-L3"],
                                 SEARCH_CONFIGS["segment-L3"]], ids=["greedy", "best-of-n", "beam", "token", "segment"])
def test_batched_equals_one_at_a_time(tiny_aligner, cfg):
    prompts = ["the dog catches a", "a cat sleeps", "children eat ice cream"]
    kw = dict(search=cfg.replace(max_new_tokens=48), reward=letters, json_schema=SCHEMA)
    alone = [tiny_aligner.generate(p, **kw) for p in prompts]
    batched = tiny_aligner.generate_batch(prompts, batch_size=3, **kw)
    assert [r.text for r in batched] == [r.text for r in alone]
    assert all(_valid_json(r.text) for r in alone)


def test_mixed_batch_constrained_and_free(tiny_aligner):
    """A constrained search and a free one in the same lock-step batch: each as alone."""
    def run(al, item):
        return al.generate("the dog catches a", strategy="deal", beam=2, topk=2, lookahead=2, max_new_tokens=16,
                           reward=letters, **item)
    items = [{"choice": CHOICES}, {}, {"regex": PATTERN}]
    alone = [run(tiny_aligner, it).text for it in items]
    batched = [r.text for r, err in tiny_aligner.map_batched(run, items, batch_size=3)]
    assert batched == alone and alone[0] in CHOICES and re.fullmatch(PATTERN, alone[2])


def test_a_constraint_cut_by_the_budget_says_so(tiny_aligner):
    result = tiny_aligner.generate("the dog", strategy="deal", max_new_tokens=4, json_schema=SCHEMA)
    assert not result.finished
    info = result.stats["constraint"]
    assert info["complete"] is False and "max_new_tokens=4" in info["note"] and info["mask_seconds"] >= 0


@pytest.mark.parametrize("make, needle", [
    (lambda: C.json_schema({"type": "nonsense"}), "invalid JSON schema"),
    (lambda: C.json_schema("{not json"), "not valid JSON"),
    (lambda: C.json_schema([1, 2]), "must be a JSON object"),
    (lambda: C.regex("a(b"), "invalid regex"),
    (lambda: C.grammar("start: foo ("), "invalid grammar"),
    (lambda: C.grammar('root ::= "a" ('), "invalid grammar"),
    (lambda: C.choice([]), "empty list"),
    (lambda: C.choice("yes"), "list of strings"),
    (lambda: C.from_fields(regex="a", choice=["b"]), "not several"),
])
def test_bad_constraints_fail_in_one_line(make, needle):
    with pytest.raises(C.ConstraintError) as err:
        make()
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_constraint_no_token_can_start_is_refused_before_the_search(tiny_model):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    letters_only = {"<eos>": 0, **{chr(97 + i): i + 1 for i in range(26)}}  # no digit anywhere
    words = Tokenizer(models.BPE(letters_only, [], unk_token="<eos>"))
    words.pre_tokenizer, words.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<eos>")
    backend = HFBackend(tiny_model, tok)
    with pytest.raises(C.ConstraintError, match="no token of the model's vocabulary can start"):
        grammar_for(backend, C.regex("[0-9]+"))


def test_a_backend_without_per_row_masks_refuses_constraints(tiny_model, tiny_tokenizer):
    al = Aligner(NaiveHFBackend(tiny_model, tiny_tokenizer), tiny_tokenizer)
    with pytest.raises(C.ConstraintError, match="remote engine"):
        al.generate("the dog", json_schema=SCHEMA)


@pytest.mark.parametrize("mode", ["token", "segment"])
def test_the_fluency_context_rows_stay_free_while_the_answer_is_masked(tiny_aligner, mode):
    """The aligner's defaults read every answer after a neutral prompt too (fluency 1): those rows
    ride unconstrained in the same batch, the answer's rows are masked."""
    result = tiny_aligner.generate("the dog catches a", mode=mode, beam=2, topk=3, lookahead=2, max_new_tokens=48,
                                   reward=letters, json_schema=SCHEMA)
    assert result.finished and _valid_json(result.text), result.text
    assert result.fluency < 0  # the neutral context did read it


def test_the_format_task_masks_only_its_mask_rows_and_scores_json():
    from dealign.evaluation.format import TOPICS
    from dealign.evaluation.tasks import TASKS

    task = TASKS["format"]
    rows = task.rows(len(TOPICS), list(task.default_strategies), 96)
    assert len(TOPICS) >= 30 and len(rows) == 4 * len(TOPICS)
    for r in rows:
        masked = r["method"].endswith("+mask")
        assert (r["json_schema"] is not None) == masked and (r["must_match"] is None) == masked
        C.json_schema(r["meta"]["schema"])  # every schema compiles
    meta = rows[0]["meta"]
    good = json.dumps({"summary": "A dog runs after the ball.", "breed": "collie", "age_years": 3})
    m = task.metrics({"text": good, "meta": meta, "finished": True})
    assert m == {"parses": 1.0, "schema_valid": 1.0, "content": 1.0, "finished": 1.0}
    m = task.metrics({"text": '{"summary": "dog"}', "meta": meta, "finished": True})
    assert (m["parses"], m["schema_valid"]) == (1.0, 0.0)
    assert task.metrics({"text": "```json\n{", "meta": meta, "finished": False})["parses"] == 0.0


@pytest.mark.parametrize("strategy", ["greedy", "deal-token-L3", "deal-segment-L3"])
def test_a_traced_constrained_search_records_the_masked_answer(tiny_aligner, strategy):
    """Tracing (docs/trace.md) a constrained search: the same answer as untraced, and the trace's
    answer is that masked answer."""
    cfg = STRATEGIES[strategy].replace(max_new_tokens=48)
    plain = tiny_aligner.generate("the dog catches a", search=cfg, reward=letters, json_schema=SCHEMA)
    traced = tiny_aligner.generate("the dog catches a", search=cfg, reward=letters, json_schema=SCHEMA, trace=True)
    assert traced.text == plain.text and _valid_json(traced.text)
    assert traced.trace["steps"] and traced.trace["answer"]["text"] == traced.text
