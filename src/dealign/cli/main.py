"""``dealign`` commands.  Every search option defaults to None and is passed on only when given, so
the defaults shown in ``--help`` are read from ``SearchConfig`` and tuning it changes the CLI too.

Errors users can cause (bad flags, bad input lines, bad rewards, a missing model) are printed as one
``error: ...`` line on stderr, exit code 2 for usage and 1 for runtime problems, never a traceback.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, List, Optional

import typer

from ..models.loading import ModelLoadError
from ..search import STRATEGIES, SearchConfig
from .options import Settings, UsageError, parse_weights

app = typer.Typer(
    name="dealign",
    help="Decoding-time alignment (DeAL): decode as a search ranked by log-prob + lam * reward.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

_D = SearchConfig()  # only for the defaults shown in --help
_S, _R, _M = "Search (defaults from SearchConfig)", "Rewards", "Model"


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def reported_errors() -> Iterator[None]:
    """Turn the errors a user can cause into ``error: ...`` + exit code (2 usage, 1 runtime)."""
    try:
        yield
    except ModelLoadError as exc:
        _fail(str(exc), 1)
    except ValueError as exc:  # UsageError, ConfigError, RewardError, bad prompts and reward options
        _fail(str(exc), 2)
    except OSError as exc:
        _fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc), 1)
    except KeyboardInterrupt:
        _fail("interrupted (in batch mode, rerun with --resume to continue)", 130)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"dealign {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = None,
) -> None:
    """Decoding-time alignment (DeAL) for Hugging Face causal language models."""


@app.command()
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt (omit with --input).", show_default=False)] = None,
    input: Annotated[Optional[Path], typer.Option("--input", "-i", help="JSONL file of prompts (batch mode).", rich_help_panel="Batch")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="JSONL file for the answers (batch mode).", rich_help_panel="Batch")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Keep the rows already in --output and continue after them.", rich_help_panel="Batch")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the whole result as JSON.")] = False,
    explain: Annotated[bool, typer.Option("--explain", help="Also print reward breakdown, final beam and search statistics (to stderr with --json).")] = False,
    model: Annotated[Optional[str], typer.Option(help="Packaged model name, HF folder, .gguf file or cached hub id [default: packaged SmolLM2-135M-Instruct].", rich_help_panel=_M)] = None,
    draft_model: Annotated[Optional[str], typer.Option(help="Smaller model with the same tokenizer for the lookahead rollouts.", rich_help_panel=_M)] = None,
    dtype: Annotated[Optional[str], typer.Option(help="float32, bfloat16 or float16 [default: float32].", rich_help_panel=_M)] = None,
    device: Annotated[Optional[str], typer.Option(help="torch device, e.g. cpu or cuda [default: cpu].", rich_help_panel=_M)] = None,
    strategy: Annotated[Optional[str], typer.Option(help=f"{' | '.join(STRATEGIES)} [default: {_D.strategy}].", rich_help_panel=_S)] = None,
    mode: Annotated[Optional[str], typer.Option(help=f"token (commit one token per step) | segment (commit the lookahead too) [default: {_D.mode}].", rich_help_panel=_S)] = None,
    beam: Annotated[Optional[int], typer.Option(help=f"Beam width [default: {_D.beam}].", rich_help_panel=_S)] = None,
    topk: Annotated[Optional[int], typer.Option(help=f"Candidate tokens per beam state [default: {_D.topk}].", rich_help_panel=_S)] = None,
    top_p: Annotated[Optional[float], typer.Option(help=f"Nucleus cut of the candidates / sampling [default: {_D.top_p}].", rich_help_panel=_S)] = None,
    lookahead: Annotated[Optional[int], typer.Option(help=f"Rollout tokens before scoring a candidate [default: {_D.lookahead}].", rich_help_panel=_S)] = None,
    lam: Annotated[Optional[float], typer.Option(help=f"Reward weight in logP + lam * R [default: {_D.lam}].", rich_help_panel=_S)] = None,
    length_penalty: Annotated[Optional[float], typer.Option(help=f"logP / len**length_penalty [default: {_D.length_penalty}].", rich_help_panel=_S)] = None,
    rollout_temperature: Annotated[Optional[float], typer.Option(help=f"0 = greedy lookahead [default: {_D.rollout_temperature}].", rich_help_panel=_S)] = None,
    temperature: Annotated[Optional[float], typer.Option(help=f"Sampling temperature (sample, best-of-n) [default: {_D.temperature}].", rich_help_panel=_S)] = None,
    n: Annotated[Optional[int], typer.Option("--n", help=f"Samples for best-of-n [default: {_D.n}].", rich_help_panel=_S)] = None,
    seed: Annotated[Optional[int], typer.Option(help=f"Random seed [default: {_D.seed}].", rich_help_panel=_S)] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help=f"Generation budget [default: {_D.max_new_tokens}].", rich_help_panel=_S)] = None,
    early_stop: Annotated[Optional[bool], typer.Option("--early-stop/--no-early-stop", help=f"Stop once no open state can beat the best finished answer [default: {_D.early_stop}].", show_default=False, rich_help_panel=_S)] = None,
    instruction: Annotated[Optional[str], typer.Option(help="Alignment instruction given as the system message (start-state adaptation).", rich_help_panel="Prompt")] = None,
    response_prefix: Annotated[Optional[str], typer.Option(help="Text the answer is forced to start with.", rich_help_panel="Prompt")] = None,
    keywords: Annotated[Optional[str], typer.Option(help="Comma-separated words the answer should contain.", rich_help_panel=_R)] = None,
    keyword_mode: Annotated[Optional[str], typer.Option(help="soft (fraction found) | hard (all or nothing) [default: soft].", rich_help_panel=_R)] = None,
    max_words: Annotated[Optional[int], typer.Option(help="Penalise answers longer than this many words.", rich_help_panel=_R)] = None,
    min_words: Annotated[Optional[int], typer.Option(help="Penalise answers shorter than this many words.", rich_help_panel=_R)] = None,
    banned: Annotated[Optional[str], typer.Option(help="Comma-separated words the answer must avoid.", rich_help_panel=_R)] = None,
    must_match: Annotated[Optional[List[str]], typer.Option(help="Regex the answer must contain (repeatable).", rich_help_panel=_R)] = None,
    must_not_match: Annotated[Optional[List[str]], typer.Option(help="Regex the answer must not contain (repeatable).", rich_help_panel=_R)] = None,
    weight: Annotated[Optional[List[str]], typer.Option(help="Reward weight NAME=W, e.g. keywords=0.7 (repeatable) [default: 1 each].", rich_help_panel=_R)] = None,
) -> None:
    """Generate an answer to PROMPT, or to every row of --input (JSONL) into --output."""
    with reported_errors():
        if prompt is not None and input is not None:
            raise UsageError("give either a PROMPT or --input FILE, not both")
        if prompt is None and input is None:
            raise UsageError("give a PROMPT, or --input FILE --output FILE for batch mode")
        if input is not None and output is None:
            raise UsageError("--input needs --output FILE for the answers")
        if input is None and (output is not None or resume):
            raise UsageError("--output and --resume are for batch mode: add --input FILE")
        if input is not None and (json_out or explain):
            raise UsageError("--json and --explain are for a single PROMPT; batch output is always JSONL")
        base = Settings.from_values(
            dict(
                strategy=strategy, mode=mode, beam=beam, topk=topk, top_p=top_p, lookahead=lookahead, lam=lam,
                length_penalty=length_penalty, rollout_temperature=rollout_temperature, temperature=temperature,
                n=n, seed=seed, max_new_tokens=max_new_tokens, early_stop=early_stop,
                instruction=instruction, response_prefix=response_prefix,
                keywords=keywords, keyword_mode=keyword_mode, max_words=max_words, min_words=min_words,
                banned=banned, must_match=must_match or None, must_not_match=must_not_match or None,
                weights=parse_weights(weight),
            )
        )
        from .loading import load_aligner

        def load():
            return load_aligner(model, draft_model=draft_model, dtype=dtype, device=device)

        if input is not None:
            from .batch import run_batch

            run_batch(input, output, base, load, resume=resume)
            return
        _generate_one(prompt, base, load, json_out=json_out, explain=explain)


def _generate_one(prompt: str, base: Settings, load, *, json_out: bool, explain: bool) -> None:
    cfg, reward = base.config(), base.build_reward()  # bad settings fail before the model loads
    result = load().generate(prompt, reward=reward, search=cfg, **base.prompt)
    if json_out:
        data = result.to_dict()
        coverage = base.coverage(result.text)
        if coverage is not None:
            data["coverage"] = coverage
        typer.echo(json.dumps(data, ensure_ascii=False, indent=2))
    else:
        typer.echo(result.text)
    if explain:
        from rich.console import Console

        from .render import explain as render

        render(result, reward, Console(stderr=json_out), base.missing(result.text) if base.keywords else None)


@app.command()
def demo(
    model: Annotated[Optional[str], typer.Option(help="Model to compare on [default: packaged SmolLM2-135M-Instruct].")] = None,
    n: Annotated[int, typer.Option("--n", help="How many of the built-in keyword sets to run.")] = 4,
) -> None:
    """Greedy vs DeAL on a few CommonGen-style keyword sets, side by side."""
    with reported_errors():
        from ..demo import run_demo

        run_demo(model=model, n=n)


@app.command("eval")
def eval_(
    task: Annotated[str, typer.Argument(help="Task to run: keywords (CommonGen).")],
    n: Annotated[int, typer.Option("--n", help="Number of items (first N of the split, after --offset).")] = 50,
    strategies: Annotated[str, typer.Option(help="Comma-separated: greedy, beam, best-of-n, sample, deal, deal-segment.")] = "greedy,beam,best-of-n,deal",
    out: Annotated[Path, typer.Option(help="Folder for input.jsonl, output.jsonl, summary.md, summary.json.")] = Path("runs/keywords"),
    model: Annotated[Optional[str], typer.Option(help="Model [default: packaged SmolLM2-135M-Instruct].")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Generation budget per answer.")] = 32,
    offset: Annotated[int, typer.Option(help="Skip this many items first.")] = 0,
    fresh: Annotated[bool, typer.Option("--fresh", help="Start over instead of resuming an interrupted run.")] = False,
) -> None:
    """Run a task end to end through the batch path and print the summary table."""
    with reported_errors():
        from .evaluate import run_eval

        run_eval(task, n=n, strategies=[s.strip() for s in strategies.split(",") if s.strip()], out=out,
                 model=model, max_new_tokens=max_new_tokens, offset=offset, resume=not fresh)


@app.command()
def bench(
    model: Annotated[Optional[str], typer.Option(help="Model [default: packaged SmolLM2-135M-Instruct].")] = None,
    prompts: Annotated[int, typer.Option(help="CommonGen dev concept sets to run (the first N).")] = 10,
    naive_prompts: Annotated[int, typer.Option(help="Prompts for the slow naive reference (the first N).")] = 2,
    max_new_tokens: Annotated[int, typer.Option(help="Generation budget per answer.")] = 32,
    json_out: Annotated[Path, typer.Option(help="Where to write the report as JSON.")] = Path("runs/bench.json"),
) -> None:
    """Greedy, naive DeAL and optimised DeAL in one run: speed, cost and quality side by side."""
    with reported_errors():
        from ..bench import markdown, run_bench

        report = run_bench(model, prompts=prompts, naive_prompts=naive_prompts, max_new_tokens=max_new_tokens,
                           progress=lambda m: typer.echo(m, err=True))
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2))
        typer.echo(markdown(report))
        typer.echo(f"\nwritten to {json_out}", err=True)


if __name__ == "__main__":  # pragma: no cover
    app(prog_name="dealign")
