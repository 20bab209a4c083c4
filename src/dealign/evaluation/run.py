"""``dealign eval TASK`` end to end: build the task's batch input, answer it through the batch path in one
run (resumable: an interrupted run continues where it stopped), then write the summary table, the plots
and ``report.md``, with the configuration and versions beside them."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import platform
import sys
from pathlib import Path

import torch
import transformers

from .. import __version__
from ..api import LOCAL_SEARCH_DEFAULTS
from ..batch import AlignerSpec, run_batch
from ..errors import ModelLoadError, ResumeError, UsageError
from ..models.loading import resolve as resolve_model
from ..rewards.registry import WEIGHTS_DIR
from ..search import SearchConfig
from ..settings import Settings
from .metrics import mean_token_nll
from .report import markdown, plot_form, plot_quality_vs_cost, plot_tradeoff, summarize, write_report
from .sentence import judge_sentence
from .tasks import TASKS


def _judge(spec: str | None, policy_loader):
    """The fluency judge: a model other than the policy (Gemma 3 270M when installed)."""

    for name in ([spec] if spec else ["gemma3-270m"]):
        try:
            judge = AlignerSpec(name).build()
            chat = bool(getattr(judge.tokenizer, "chat_template", None))  # a chat model judges the answer in context
            return name, lambda p, t: mean_token_nll(judge, p, t, chat=chat)
        except ModelLoadError as exc:
            if spec:  # asked for by name: never judge with something else
                raise ModelLoadError(f"--judge {spec!r} could not be loaded ({exc}); give a packaged model name, a "
                                     "model folder or a .gguf file, or leave --judge out for Gemma 3 270M") from None
            print(f"fluency judge {name!r} unavailable ({exc}); using the policy model", file=sys.stderr)
    policy = policy_loader()
    return "policy model", lambda p, t: mean_token_nll(policy, p, t)


def packaged_rewards_fingerprint() -> str:
    """A short hash of every packaged reward head: a resumed run must be scored by the same heads."""
    digest = hashlib.sha256()
    for path in sorted(p for p in WEIGHTS_DIR.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(WEIGHTS_DIR)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def run_eval(task: str, *, n: int, strategies: list[str] | None, out: Path, model: str | None, max_new_tokens: int | None,
             offset: int = 0, resume: bool = True, seed: int = 0, judge: str | None = None,
             workers: int = 1, settings: dict[str, dict] | None = None, batch_size: int = 1) -> list[dict]:
    """Run ``task`` end to end (see the module's docstring); ``settings``: search settings per strategy label
    (``{"deal": {"lookahead": 2}}``, as :func:`dealign.settings.parse_strategy_settings` reads ``--set``).
    Returns the summary table."""
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}; available: {', '.join(TASKS)}")
    t = TASKS[task]
    strategies = strategies or list(t.default_strategies)  # None / empty: the task's own set and budget
    max_new_tokens = max_new_tokens or t.max_new_tokens
    out.mkdir(parents=True, exist_ok=True)
    try:
        rows = t.rows(n, strategies, max_new_tokens, offset=offset, seed=seed, settings=settings)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if judge and t.fluency:  # a judge that cannot be found fails now, not after the whole run
        try:
            resolve_model(judge)
        except ModelLoadError as exc:
            raise ModelLoadError(f"--judge {judge!r}: {exc}") from None
    if t.form_metrics:
        judge_sentence("The judge is ready.")  # the sentence parser: JudgeUnavailable names the install
    inp, outp = out / "input.jsonl", out / "output.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    spec = AlignerSpec(model)
    policy = functools.cache(spec.build)  # built once, for the answers and (failing another) the fluency judge

    config = {"task": task, "n": n, "offset": offset, "seed": seed, "model": model,
              "max_new_tokens": max_new_tokens, "strategies": {s: rows_for(rows, s) for s in strategies},
              "search_defaults": dataclasses.asdict(SearchConfig(**LOCAL_SEARCH_DEFAULTS)), "instruction": t.instruction,
              "packaged_rewards": packaged_rewards_fingerprint()}
    previous = out / "config.json"
    if resume and outp.exists() and previous.exists():
        try:
            before = json.loads(previous.read_text(encoding="utf-8")).get("packaged_rewards")
        except (OSError, json.JSONDecodeError):
            before = None
        if before is not None and before != config["packaged_rewards"]:
            raise UsageError(f"{out} holds a run scored with other packaged reward heads (retrained or updated since); "
                             "add --fresh to start it over, or give another --out")
    previous.write_text(json.dumps(config, indent=2), encoding="utf-8")  # now, so an interrupted run is checked too
    try:
        run_batch(inp, outp, Settings.from_values({}), spec, resume=resume, workers=workers, build=policy,
                  batch_size=batch_size)
    except ResumeError as exc:
        raise UsageError(f"{out} holds a run with other settings ({exc.reason}); "
                         "add --fresh to start it over, or give another --out") from None
    answers = [json.loads(line) for line in outp.read_text(encoding="utf-8").splitlines() if line.strip()]
    if t.fluency:
        judge_name, nll = _judge(judge, policy)
        print(f"scoring fluency with {judge_name} ...", file=sys.stderr)
    else:  # harm tasks: --judge is the yes/no LM judge of harmlessness (and helpfulness)
        judge_name, nll = judge or "smollm2 (packaged)", None
        print(f"scoring with R_harmless, the profanity classifier, MiniLM and the LM judge {judge_name} ...", file=sys.stderr)
    table = summarize(t, answers, nll=nll, judge=None if t.fluency else judge)
    (out / "metrics.jsonl").write_text("".join(json.dumps(
        {k: a.get(k) for k in ("id", "method", "prompt", "response_prefix", "text", "metrics", "tokens", "seconds", "finished")},
        ensure_ascii=False) + "\n" for a in answers), encoding="utf-8")
    plots = [plot_quality_vs_cost(t, table, out / f"{task}_quality_vs_seconds.png")]
    if t.form_metrics:
        plots.append(plot_form(t, table, out / f"{task}_sentence_form.png"))
    if t.tradeoff_plot:
        plots.append(plot_tradeoff(table, out / f"{task}_harmless_vs_helpful.png"))

    header = (
        f"task **{task}** ({t.describe}); data: {n} items from offset {offset}; model: {model or 'smollm2 (default)'}; "
        f"{'fluency judge' if t.fluency else 'LM judge'}: {judge_name}; max new tokens {max_new_tokens}; seed {seed}; "
        f"dealign {__version__}, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{platform.machine()}, {torch.get_num_threads()} threads; {datetime.datetime.now():%Y-%m-%d %H:%M}"
    )
    config["judge"] = judge_name
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out / "summary.json").write_text(json.dumps({"header": header, "table": table}, indent=2), encoding="utf-8")
    (out / "summary.md").write_text(header + "\n\n" + markdown(table) + "\n", encoding="utf-8")
    write_report(out, header, [(t, table, plots)])
    print(header + "\n\n" + markdown(table))
    return table


def rows_for(rows: list[dict], label: str) -> dict:
    """The settings a strategy's rows carried (its first row, without the item's own fields)."""
    first = next(r for r in rows if r["method"] == label)
    return {k: v for k, v in first.items() if k not in ("id", "prompt", "meta", "keywords", "max_words", "weights")}
