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

from ..api import LOCAL_SEARCH_DEFAULTS
from ..batch import AlignerSpec, run_batch
from ..constraints import read_text_or_file
from ..errors import ModelLoadError, UsageError
from ..profiles import PROFILES, describe
from ..search import STRATEGIES, SearchConfig
from ..server.limits import ServerLimits
from ..settings import SETTING_FIELDS, Settings, parse_weights

app = typer.Typer(
    name="dealign",
    help="Decoding-time alignment (DeAL): decode as a search ranked by log-prob + lam * reward.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

_D = SearchConfig(**LOCAL_SEARCH_DEFAULTS)  # only for the defaults shown in --help (a local model's)
_SL = ServerLimits()  # likewise for `dealign serve`
_S, _R, _M = "Search (defaults from SearchConfig)", "Rewards", "Model"
_E = "Remote engine"
_F = "Format (hard constraints)"


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
    workers: Annotated[int, typer.Option("--workers", help="Answer the rows on N Ray actors, each with its own model (needs `pip install 'dealign[ray]'`); same output as 1.", rich_help_panel="Batch")] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Search N rows at a time in lock-step: one forward pass per step for all of them, a finished row's place taken by the next; same answers as 1.", rich_help_panel="Batch")] = 1,
    json_out: Annotated[bool, typer.Option("--json", help="Print the whole result as JSON.")] = False,
    explain: Annotated[bool, typer.Option("--explain", help="Also print reward breakdown, final beam and search statistics (to stderr with --json).")] = False,
    trace_file: Annotated[Optional[Path], typer.Option("--trace", help="Write the search's trace, every step's beam and candidates (docs/trace.md), to this JSON file; open it in the explorer page (`dealign explore`). Batch mode: the field \"trace\": true per line.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Packaged model name, HF folder, .gguf file or cached hub id [default: packaged SmolLM2-135M-Instruct].", rich_help_panel=_M)] = None,
    draft_model: Annotated[Optional[str], typer.Option(help="Smaller model with the same tokenizer for the lookahead rollouts.", rich_help_panel=_M)] = None,
    dtype: Annotated[Optional[str], typer.Option(help="float32, bfloat16 or float16 [default: float32].", rich_help_panel=_M)] = None,
    device: Annotated[Optional[str], typer.Option(help="torch device, e.g. cpu or cuda [default: cpu].", rich_help_panel=_M)] = None,
    engine_url: Annotated[Optional[str], typer.Option(help="Run the forward passes on a serving engine at this URL (llama.cpp server, vLLM, SGLang); --model then only names its tokenizer. Use --mode segment: round trips dominate.", rich_help_panel=_E)] = None,
    engine_dialect: Annotated[Optional[str], typer.Option(help="llamacpp (POST /completion) | vllm (POST /v1/completions; also SGLang) [default: llamacpp].", rich_help_panel=_E)] = None,
    engine_model: Annotated[Optional[str], typer.Option(help="Served model name for the vllm dialect [default: the first of GET /v1/models].", rich_help_panel=_E)] = None,
    engine_top_n: Annotated[Optional[int], typer.Option(help="Log-probabilities per position asked of the engine; must be >= topk (vLLM: --max-logprobs) [default: 20].", rich_help_panel=_E)] = None,
    strategy: Annotated[Optional[str], typer.Option(help=f"{' | '.join(STRATEGIES)} [default: {_D.strategy}].", rich_help_panel=_S)] = None,
    mode: Annotated[Optional[str], typer.Option(help=f"token (commit one token per step) | segment (commit the lookahead too) [default: {_D.mode}].", rich_help_panel=_S)] = None,
    beam: Annotated[Optional[int], typer.Option(help=f"Beam width [default: {_D.beam}].", rich_help_panel=_S)] = None,
    topk: Annotated[Optional[int], typer.Option(help=f"Candidate tokens per beam state [default: {_D.topk}].", rich_help_panel=_S)] = None,
    top_p: Annotated[Optional[float], typer.Option(help=f"Nucleus cut of the candidates / sampling [default: {_D.top_p}].", rich_help_panel=_S)] = None,
    lookahead: Annotated[Optional[int], typer.Option(help=f"Rollout tokens before scoring a candidate [default: {_D.lookahead}].", rich_help_panel=_S)] = None,
    lam: Annotated[Optional[float], typer.Option(help=f"Reward weight in logP + lam * R [default: {_D.lam}].", rich_help_panel=_S)] = None,
    fluency: Annotated[Optional[float], typer.Option(help=f"Weight of the answer's log-prob after a neutral request (--fluency-prompt), added to the score: keeps keyword lists and fragments from winning; 0 turns it off [default: {_D.fluency}].", rich_help_panel=_S)] = None,
    fluency_prompt: Annotated[Optional[str], typer.Option(help=f"The neutral request the answer is also read after, for --fluency [default: {_D.fluency_prompt!r}].", rich_help_panel=_S)] = None,
    length_penalty: Annotated[Optional[float], typer.Option(help=f"logP / len**length_penalty [default: {_D.length_penalty}].", rich_help_panel=_S)] = None,
    rollout_temperature: Annotated[Optional[float], typer.Option(help=f"0 = greedy lookahead [default: {_D.rollout_temperature}].", rich_help_panel=_S)] = None,
    temperature: Annotated[Optional[float], typer.Option(help=f"Sampling temperature (sample, best-of-n) [default: {_D.temperature}].", rich_help_panel=_S)] = None,
    n: Annotated[Optional[int], typer.Option("--n", help=f"Samples for best-of-n [default: {_D.n}].", rich_help_panel=_S)] = None,
    seed: Annotated[Optional[int], typer.Option(help=f"Random seed [default: {_D.seed}].", rich_help_panel=_S)] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help=f"Generation budget [default: {_D.max_new_tokens}].", rich_help_panel=_S)] = None,
    early_stop: Annotated[Optional[bool], typer.Option("--early-stop/--no-early-stop", help=f"Stop once no open state can beat the best finished answer [default: {_D.early_stop}].", show_default=False, rich_help_panel=_S)] = None,
    open_tokens: Annotated[Optional[int], typer.Option(help=f"The opening schedule: search the first N tokens in token mode with --open-topk / --open-lookahead, the rest with the settings above (0 = off) [default: {_D.open_tokens}].", rich_help_panel=_S)] = None,
    open_topk: Annotated[Optional[int], typer.Option(help=f"Actions per state during the opening [default: {_D.open_topk}].", rich_help_panel=_S)] = None,
    open_lookahead: Annotated[Optional[int], typer.Option(help=f"Rollout tokens per candidate during the opening [default: {_D.open_lookahead}].", rich_help_panel=_S)] = None,
    profile: Annotated[Optional[str], typer.Option(help="An alignment profile: rewards, weights, search settings and instruction chosen together (see `dealign profiles`); any flag given beside it wins.", rich_help_panel=_S)] = None,
    instruction: Annotated[Optional[List[str]], typer.Option(help="Alignment instruction given as the system message (start-state adaptation). Repeat it for several start states searched together (DeAL only; '' = no instruction); the JSON output's start says which one the answer grew from.", rich_help_panel="Prompt")] = None,
    response_prefix: Annotated[Optional[str], typer.Option(help="Text the answer is forced to start with.", rich_help_panel="Prompt")] = None,
    keywords: Annotated[Optional[str], typer.Option(help="Comma-separated words the answer should contain.", rich_help_panel=_R)] = None,
    keyword_mode: Annotated[Optional[str], typer.Option(help="soft (fraction found) | hard (all or nothing) [default: soft].", rich_help_panel=_R)] = None,
    max_words: Annotated[Optional[int], typer.Option(help="Penalise answers longer than this many words.", rich_help_panel=_R)] = None,
    min_words: Annotated[Optional[int], typer.Option(help="Penalise answers shorter than this many words.", rich_help_panel=_R)] = None,
    banned: Annotated[Optional[str], typer.Option(help="Comma-separated words the answer must avoid.", rich_help_panel=_R)] = None,
    well_formed: Annotated[Optional[bool], typer.Option("--well-formed/--no-well-formed", help="Reward answers that read as a sentence (no keyword list, loop or verbless fragment); weight with --weight well_formed=W [default: on with --keywords].", show_default=False, rich_help_panel=_R)] = None,
    finish_with_keywords: Annotated[Optional[bool], typer.Option("--finish-with-keywords/--no-finish-with-keywords", help="Make ending before every keyword is in cost its weight (--weight finish_with_keywords=W) [default: on with --keywords].", show_default=False, rich_help_panel=_R)] = None,
    must_match: Annotated[Optional[List[str]], typer.Option(help="Regex the answer must contain (repeatable).", rich_help_panel=_R)] = None,
    must_not_match: Annotated[Optional[List[str]], typer.Option(help="Regex the answer must not contain (repeatable).", rich_help_panel=_R)] = None,
    json_schema: Annotated[Optional[str], typer.Option("--json-schema", help="The answer is JSON valid under this schema (a file or the JSON text): a hard mask on every token, not a reward.", rich_help_panel=_F)] = None,
    regex: Annotated[Optional[str], typer.Option(help="The answer matches this regex entirely (hard mask).", rich_help_panel=_F)] = None,
    grammar: Annotated[Optional[str], typer.Option(help="The answer is in this grammar's language (a Lark or GBNF file, or its text; hard mask).", rich_help_panel=_F)] = None,
    choice: Annotated[Optional[List[str]], typer.Option(help="The answer is exactly one of these strings (repeatable; hard mask).", rich_help_panel=_F)] = None,
    weight: Annotated[Optional[List[str]], typer.Option(help="Reward weight NAME=W, e.g. keywords=0.7 (repeatable) [default: 1 each].", rich_help_panel=_R)] = None,
    reward: Annotated[Optional[List[str]], typer.Option("--reward", help="Named or model reward NAME=W, e.g. harmless=0.75 (repeatable; W defaults to 1): harmless, helpful, relevance, non_toxic, sentiment, judge_harmless, judge_helpful, or a reward folder path.", rich_help_panel=_R)] = None,
    reward_model: Annotated[Optional[List[str]], typer.Option("--reward-model", help="Reward model folder (from train-reward, or a HF sequence classifier as PATH#LABEL), weight 1 (repeatable; weight it with --reward PATH=W).", rich_help_panel=_R)] = None,
    reward_every_n_tokens: Annotated[Optional[int], typer.Option(help="Score the model rewards (--reward/--reward-model) only every N generated tokens (and on finished answers): cheaper searches [default: 1].", rich_help_panel=_R)] = None,
    reward_finished_only: Annotated[Optional[bool], typer.Option("--reward-finished-only", help="Score the model rewards only on finished answers (0 before).", show_default=False, rich_help_panel=_R)] = None,
) -> None:
    """Generate an answer to PROMPT, or to every row of --input (JSONL) into --output."""
    options = dict(locals())  # the flags named after a setting reach Settings as they are (see _setting_values)
    with reported_errors():
        if prompt is not None and input is not None:
            raise UsageError("give either a PROMPT or --input FILE, not both")
        if prompt is None and input is None:
            raise UsageError("give a PROMPT, or --input FILE --output FILE for batch mode")
        if input is not None and output is None:
            raise UsageError("--input needs --output FILE for the answers")
        if input is None and (output is not None or resume):
            raise UsageError("--output and --resume are for batch mode: add --input FILE")
        if workers < 1:
            raise UsageError(f"--workers must be >= 1; got {workers}")
        if input is None and workers > 1:
            raise UsageError("--workers is for batch mode: add --input FILE --output FILE")
        if input is None and batch_size != 1:
            raise UsageError("--batch-size is for batch mode: add --input FILE --output FILE")
        if input is not None and (json_out or explain or trace_file):
            raise UsageError("--json, --explain and --trace are for a single PROMPT; batch output is always JSONL "
                             '(a line\'s trace: the field "trace": true)')
        base = Settings.from_values(_setting_values(options))
        for note in base.notes:
            typer.echo(f"note: {note}", err=True)
        if engine_url is None and (engine_dialect or engine_model or engine_top_n):
            raise UsageError("--engine-dialect, --engine-model and --engine-top-n need --engine-url URL")
        if engine_url is not None and base.constraint:
            raise UsageError(f"--{next(iter(base.constraint)).replace('_', '-')} needs a local model: a remote engine cannot "
                             "take the constraint's mask per row; drop --engine-url")
        if engine_url is not None and (draft_model or dtype or device):
            raise UsageError("--draft-model, --dtype and --device are for a local model; with --engine-url the engine runs the model")
        spec = AlignerSpec(model, draft_model=draft_model, dtype=dtype, device=device, engine_url=engine_url,
                           engine_dialect=engine_dialect, engine_model=engine_model, engine_top_n=engine_top_n)
        if input is not None:
            run_batch(input, output, base, spec, resume=resume, workers=workers, batch_size=batch_size)
            return
        _generate_one(prompt, base, spec, json_out=json_out, explain=explain, trace_file=trace_file)


# flags whose value is parsed into a setting of another name; every other flag named after a setting
# (SETTING_FIELDS: a SearchConfig field, a reward option, ...) is passed on as it is
_PARSED_FLAGS = {
    "weights": lambda o: parse_weights(o["weight"]),
    "named_rewards": lambda o: parse_weights(o["reward"], "--reward", "harmless=0.75", default=1.0),
    "trace": lambda o: True if o.get("trace_file") is not None else None,
}


def _setting_values(options: dict) -> dict:
    """``generate``'s flags as ``Settings.from_values`` takes them: a repeatable flag given no times
    is unset, like any other flag left out."""
    values = {name: options[name] for name in SETTING_FIELDS if name in options}
    values.update({name: parse(options) for name, parse in _PARSED_FLAGS.items()})
    for name in ("json_schema", "grammar"):  # a file, or the text itself
        if values.get(name):
            values[name] = read_text_or_file(values[name])
    if isinstance(values.get("instruction"), (list, tuple)) and len(values["instruction"]) == 1:
        values["instruction"] = values["instruction"][0]  # one is the instruction; several, start states searched together
    return {name: None if isinstance(v, (list, tuple)) and not v else v for name, v in values.items()}


def _generate_one(prompt: str, base: Settings, spec: AlignerSpec, *, json_out: bool, explain: bool,
                  trace_file: Optional[Path] = None) -> None:
    base.config()  # bad settings fail before the model loads
    reward = base.build_reward()
    # only the given settings: the rest are the aligner's defaults (segment mode for a remote engine)
    result = spec.build().generate(prompt, reward=reward, trace=base.output.get("trace", False),
                                   **base.search, **base.prompt, **base.constraint)
    if trace_file is not None:
        from ..search.trace import save

        typer.echo(f"trace: {len(result.trace['steps'])} steps written to {save(result.trace, trace_file)}", err=True)
    if json_out:
        data = result.to_dict()
        if trace_file is not None:
            data.pop("trace")  # it is in the file
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
def profiles() -> None:
    """List the alignment profiles (--profile, batch field "profile", server alignment.profile) and what each sets."""
    typer.echo("\n\n".join(describe(p) for p in PROFILES.values()))


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
    task: Annotated[str, typer.Argument(help="Task: keywords (CommonGen), length (word limits), harmless (HarmfulQ + HH red-team), tradeoff (harmless/helpful weight sweep), jailbreak (continuation attack) or format (JSON with given fields: soft reward vs hard schema mask).")],
    n: Annotated[int, typer.Option("--n", help="Number of items (the first N, after --offset).")] = 50,
    strategies: Annotated[Optional[str], typer.Option(help="Comma-separated: greedy, sample, beam, best-of-n, prompt (alignment instruction only), deal, deal-segment, prompt+deal; tradeoff also 'deal w=.75/.25' etc. [default: the task's set]")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Folder for input/output JSONL, summary, plots, report.md [default: runs/TASK].")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model [default: packaged SmolLM2-135M-Instruct].")] = None,
    judge: Annotated[Optional[str], typer.Option(help="Judge model: fluency NLL for keywords/length [default: packaged Gemma 3 270M, else the policy]; the yes/no LM judge for harmless/tradeoff/jailbreak [default: packaged SmolLM2].")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Generation budget per answer [default: 32 for keywords/length, 64 for the harm tasks].")] = None,
    offset: Annotated[int, typer.Option(help="Skip this many items first.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of every search (sampling strategies).")] = 0,
    fresh: Annotated[bool, typer.Option("--fresh", help="Start over instead of resuming an interrupted run.")] = False,
    workers: Annotated[int, typer.Option("--workers", help="Answer the rows on N Ray actors (needs `pip install 'dealign[ray]'`).")] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Search N rows at a time in lock-step (same answers as 1).")] = 1,
    set_: Annotated[Optional[List[str]], typer.Option("--set", help="A search setting for one strategy, STRATEGY.SETTING=VALUE, e.g. deal.lookahead=2 or best-of-n.n=16 (repeatable).")] = None,
) -> None:
    """Run a task end to end through the batch path; write summary, plots and report.md."""
    with reported_errors():
        from ..evaluation.run import run_eval
        from ..settings import parse_strategy_settings

        run_eval(task, n=n, strategies=[s.strip() for s in (strategies or "").split(",") if s.strip()] or None,
                 out=out or Path("runs") / task, model=model, max_new_tokens=max_new_tokens, offset=offset,
                 resume=not fresh, seed=seed, judge=judge, workers=workers, settings=parse_strategy_settings(set_),
                 batch_size=batch_size)


@app.command("eval-reward")
def eval_reward(
    out: Annotated[Path, typer.Option(help="Folder for pairs.summary.json.")] = Path("runs/eval-reward"),
    no_judge: Annotated[bool, typer.Option("--no-judge", help="Skip the (slow) LM judge signal.")] = False,
) -> None:
    """Held-out pairwise accuracy of the packaged R_harmless and its heads, next to untrained signals."""
    with reported_errors():
        from ..evaluation.reward_pairs import run_reward_pairs
        from ..evaluation.table import markdown_table

        typer.echo(markdown_table(run_reward_pairs(out, judge=not no_judge)))


@app.command("train-reward")
def train_reward(
    data: Annotated[Path, typer.Argument(help="Preference pairs: JSONL (.jsonl or .jsonl.gz) with chosen/rejected (and prompt), or HH-RLHF dialogues.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the trained reward (load it with --reward-model PATH).")],
    pairs: Annotated[str, typer.Option(help="preference (the file's pairs) | helpful (synthetic: real answers over refusals and off-topic answers).")] = "preference",
    holdout: Annotated[float, typer.Option(help="Share of pairs held out for the accuracy figure (fixed-seed split).")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the split, the initialisation and the batches.")] = 0,
    epochs: Annotated[int, typer.Option(help="Most epochs (early stopping on a tenth of the training pairs).")] = 60,
    hidden: Annotated[Optional[int], typer.Option(help="Hidden units of the head (0 = linear) [default: 128 on sentence embeddings, 0 on LM hidden states].")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="AdamW weight decay [default: 0.01 on sentence embeddings, 1.0 on LM hidden states].")] = None,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-3,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N pairs of the file.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Reward name shown in breakdowns [default: the folder name].")] = None,
    backbone: Annotated[Optional[List[str]], typer.Option(help="minilm (packaged all-MiniLM-L6-v2), a sentence-transformers folder, or a causal LM whose hidden states the head reads (smollm2, gemma3-270m, a folder). Repeat it to train one head per backbone and save their ensemble. [default: minilm]")] = None,
    weight: Annotated[Optional[List[float]], typer.Option(help="Ensemble weight of each --backbone, in order [default: equal].")] = None,
    by_prompt: Annotated[bool, typer.Option("--by-prompt", help="Hold out whole prompts rather than single pairs (for data with several pairs per request).")] = False,
) -> None:
    """Train a pairwise (Bradley–Terry) reward head on a frozen backbone (or an ensemble of heads); print held-out accuracy."""
    with reported_errors():
        from ..training import train_reward as train

        _, report = train(data, out, pairs=pairs, holdout=holdout, seed=seed, epochs=epochs, hidden=hidden,
                          weight_decay=weight_decay, lr=lr, limit=limit, name=name,
                          backbone=backbone or None, weights=weight or None, by_prompt=by_prompt)
        typer.echo(f"{report.pairs} pairs: {report.train_pairs} train, {report.heldout_pairs} held out")
        for m in report.members:
            typer.echo(f"  head on {m['backbone']} (weight {m['weight']:.2f}): loss {m['loss_first']:.4f} -> "
                       f"{m['loss_last']:.4f} · best epoch {m['epochs']} · held-out accuracy {m['heldout_accuracy']:.3f}")
        what = "ensemble" if report.members else (
            f"loss {report.loss_first:.4f} -> {report.loss_last:.4f} · best epoch {report.epochs}")
        typer.echo(f"{what} · accuracy train {report.train_accuracy:.3f}, held-out {report.heldout_accuracy:.3f} · "
                   f"{report.seconds:.0f} s")
        typer.echo(f"saved to {report.out}; use it with --reward-model {report.out}")


def _read_or_make(path: Path, read, make):
    """Training data kept beside a reward: ``read(path)`` when the file exists, else ``make(path)``,
    which writes it there (so a retrain reuses it) and returns what it wrote."""
    if path.is_file():
        return read(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return make(path)


@app.command("train-gate")
def train_gate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for gate.json [default: the packaged one, used by the named reward harm_gated].")] = None,
    benign: Annotated[Optional[Path], typer.Option(help="Benign questions, one JSON object {\"q\": ...} per line; written by SmolLM2 (about 3 min) when the file is missing.")] = None,
    l2: Annotated[float, typer.Option(help="L2 penalty of the logistic head.")] = 1e-3,
) -> None:
    """Train the prompt gate, P(harmful | request) on MiniLM embeddings, that mixes R_harmless and R_helpful in harm_gated."""
    with reported_errors():

        from ..evaluation.data import data_dir
        from ..evaluation.harmless import benign_questions, harmfulq
        from ..rewards.gated import gate_of
        from ..rewards.registry import WEIGHTS_DIR
        from ..training import prompt_gate as pg

        out = out or WEIGHTS_DIR / "harm_gate"
        ok = _read_or_make(benign or out / "benign_questions.jsonl", pg.read_questions, pg.generate_benign)
        bad = pg.harmful_prompts(data_dir())
        w, b = pg.fit_gate(bad, ok, l2=l2)
        dev = pg.dev_accuracy(gate_of(w, b), harmfulq(20, 100), benign_questions(split="dev"))
        path = pg.save_gate(out, w, b, {"harmful": len(bad), "benign": len(ok), "l2": l2, "dev": dev})
        typer.echo(f"{len(bad)} harmful, {len(ok)} benign requests; dev (HarmfulQ 100-119, benign dev split): "
                   f"flags {dev['harmful_flagged']:.2f} of harmful, passes {dev['benign_passed']:.2f} of benign; "
                   f"saved to {path}")


@app.command("train-safety")
def train_safety(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the reward [default: the packaged one, the named reward safety].")] = None,
    pairs: Annotated[Optional[Path], typer.Option(help="Response pairs (.jsonl.gz, rows {prompt, chosen, rejected}); written by SmolLM2 (about 10 min) when the file is missing [default: OUT/pairs.jsonl.gz].")] = None,
    backbone: Annotated[Optional[List[str]], typer.Option(help="What the head reads, as in train-reward: minilm (the packaged all-MiniLM-L6-v2), or a causal LM (smollm2, gemma3-270m, a folder; about 25 min for smollm2 here); repeat it for an ensemble. [default: minilm]")] = None,
) -> None:
    """Train R_safety: declining harmful requests over answering them, answering benign ones over declining them."""
    with reported_errors():
        import random as _random
        import tempfile

        from ..evaluation.data import data_dir
        from ..profiles import SAFETY_INSTRUCTION
        from ..rewards.registry import WEIGHTS_DIR
        from ..training import prompt_gate as pg
        from ..training import safety_pairs as sp
        from ..training import train_reward as train

        def make(path: Path) -> list[dict]:
            rng = _random.Random(0)
            harmful = sp.harmful_sample(pg.harmful_prompts(data_dir()), rng)
            benign = pg.read_questions(WEIGHTS_DIR / "harm_gate" / "benign_questions.jsonl")
            rows = sp.generate_rows(harmful, benign, SAFETY_INSTRUCTION, rng)
            sp.write_rows(path, rows)
            return rows

        out = out or WEIGHTS_DIR / "safety"
        rows = _read_or_make(pairs or out / "pairs.jsonl.gz", sp.read_rows, make)
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "safety_pairs.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in sp.with_openings(rows)), encoding="utf-8")
            _, report = train(data, out, name="safety", by_prompt=True, progress=False, backbone=backbone or sp.BACKBONE)
        typer.echo(f"{len(rows)} requests, {report.train_pairs + report.heldout_pairs} pairs (whole and cut to their "
                   f"openings); held-out requests: accuracy {report.heldout_accuracy:.3f} (train {report.train_accuracy:.3f}); "
                   f"saved to {report.out}")


@app.command()
def bench(
    model: Annotated[Optional[str], typer.Option(help="Model [default: packaged SmolLM2-135M-Instruct].")] = None,
    prompts: Annotated[int, typer.Option(help="CommonGen dev concept sets to run (the first N).")] = 10,
    naive_prompts: Annotated[int, typer.Option(help="Prompts for the slow naive reference (the first N).")] = 2,
    max_new_tokens: Annotated[int, typer.Option(help="Generation budget per answer.")] = 32,
    json_out: Annotated[Path, typer.Option(help="Where to write the report as JSON.")] = Path("runs/bench.json"),
    remote: Annotated[Optional[str], typer.Option(help="Also run greedy and DeAL (token, segment) through a serving engine at this URL, serving the same model; 'auto' starts the built llama-server on the packaged GGUF.")] = None,
    remote_dialect: Annotated[str, typer.Option(help="llamacpp | vllm, for --remote URL.")] = "llamacpp",
    batch_sizes: Annotated[Optional[str], typer.Option(help="Comma-separated batch sizes, e.g. 1,4,8,16: instead of the rows above, greedy and default DeAL over the same --prompts at each size, searched in lock-step (throughput, forward passes, peak memory, answers identical to size 1).")] = None,
    device: Annotated[Optional[str], typer.Option(help="torch device for --batch-sizes, e.g. cuda [default: cpu].")] = None,
    batch_reward: Annotated[Optional[str], typer.Option(help="With --batch-sizes: also DeAL (segment mode) with this named model reward, e.g. harmless (the names of --reward NAME=W), whose forward passes join across the batch too.")] = None,
    suite: Annotated[str, typer.Option(help="speed (the rows above, on CommonGen) | harm-cost (seconds per HarmfulQ answer of greedy and DeAL with harmless_fast / harmless read incrementally / naively; --prompts questions, --model, --max-new-tokens, --json-out apply) | format-cost (greedy and DeAL on the format task's prompts with and without the JSON schema mask: tokens/s and the mask's own time) | cpu-step (one cached decode step by rows, in both weight layouts, and with the searches' threads holding OpenMP teams or not; --model, --json-out apply).")] = "speed",
) -> None:
    """Greedy, naive DeAL and optimised DeAL in one run: speed, cost and quality side by side."""
    with reported_errors():
        if suite not in ("speed", "harm-cost", "format-cost", "cpu-step"):
            raise UsageError(f"--suite must be speed, harm-cost, format-cost or cpu-step; got {suite!r}")
        if suite == "cpu-step":
            from ..tools.cpu_step import markdown as cpu_markdown, run_cpu_step

            report = run_cpu_step(model, progress=lambda m: typer.echo(m, err=True))
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(report, indent=2))
            typer.echo(cpu_markdown(report))
            return
        if suite == "format-cost":
            from ..tools.bench import format_cost_markdown, run_format_cost

            report = run_format_cost(model, prompts=prompts, max_new_tokens=max_new_tokens,
                                     progress=lambda m: typer.echo(m, err=True))
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(report, indent=2))
            typer.echo(format_cost_markdown(report))
            return
        if suite == "harm-cost":
            _bench_harm_cost(model, prompts, max_new_tokens, json_out)
            return
        if batch_sizes is not None:
            _bench_batches(model, device, prompts, max_new_tokens, batch_sizes, json_out, batch_reward)
            return
        if batch_reward is not None:
            raise UsageError("--batch-reward is for --batch-sizes")
        if device is not None:
            raise UsageError("--device is for --batch-sizes; the speed rows run on the CPU")
        from ..tools.bench import markdown, run_bench

        report = run_bench(model, prompts=prompts, naive_prompts=naive_prompts, max_new_tokens=max_new_tokens,
                           progress=lambda m: typer.echo(m, err=True), remote=remote, remote_dialect=remote_dialect)
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2))
        typer.echo(markdown(report))
        typer.echo(f"\nwritten to {json_out}", err=True)


def _bench_batches(model: Optional[str], device: Optional[str], prompts: int, max_new_tokens: int, sizes: str,
                   json_out: Path, batch_reward: Optional[str] = None) -> None:
    from ..tools.bench_batch import markdown as batch_markdown, run_batch_bench

    try:
        values = [int(x) for x in sizes.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise UsageError(f"--batch-sizes must be comma-separated integers >= 1, e.g. 1,4,8; got {sizes!r}")
    if batch_reward is not None:
        from ..rewards import named_reward

        named_reward(batch_reward)  # an unknown name fails now, in one line, before the model loads
    aligner = AlignerSpec(model, device=device).build()
    report = run_batch_bench(aligner, prompts=prompts, batch_sizes=values, max_new_tokens=max_new_tokens,
                             model_reward=batch_reward, progress=lambda m: typer.echo(m, err=True))
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(report, indent=2))
    typer.echo(batch_markdown(report))
    typer.echo(f"\nwritten to {json_out}", err=True)


def _bench_harm_cost(model: Optional[str], prompts: int, max_new_tokens: int, json_out: Path) -> None:
    from ..tools.harm_cost import run_harm_cost
    from ..evaluation.table import markdown_table

    rows = run_harm_cost(prompts, max_new_tokens, model)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    typer.echo(markdown_table(rows))
    typer.echo(f"\nwritten to {json_out}", err=True)


_L, _V = "Limits per request", "Server"


@app.command()
def serve(
    model: Annotated[Optional[str], typer.Option(help="Packaged model name, HF folder, .gguf file or cached hub id [default: packaged SmolLM2-135M-Instruct].", rich_help_panel=_M)] = None,
    draft_model: Annotated[Optional[str], typer.Option(help="Smaller model with the same tokenizer for the lookahead rollouts.", rich_help_panel=_M)] = None,
    dtype: Annotated[Optional[str], typer.Option(help="float32, bfloat16 or float16 [default: float32].", rich_help_panel=_M)] = None,
    device: Annotated[Optional[str], typer.Option(help="torch device, e.g. cpu or cuda [default: cpu].", rich_help_panel=_M)] = None,
    model_name: Annotated[Optional[str], typer.Option(help="The id clients put in \"model\" [default: the --model name, or its folder/file name].", rich_help_panel=_M)] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).", rich_help_panel=_V)] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", rich_help_panel=_V)] = 8000,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads for the search [default: torch's choice].", rich_help_panel=_V)] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level: critical, error, warning, info, debug.", rich_help_panel=_V)] = "info",
    max_tokens: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.", rich_help_panel=_L)] = _SL.max_tokens,
    max_candidates: Annotated[int, typer.Option(help="Largest search width, the most tokens one step rolls out: beam x topk x max(1, lookahead) for DeAL (an opening step's if wider), beam x beam, n for best-of-n.", rich_help_panel=_L)] = _SL.max_candidates,
    max_prompt_tokens: Annotated[int, typer.Option(help="Longest prompt, in tokens after the chat template.", rich_help_panel=_L)] = _SL.max_prompt_tokens,
    timeout: Annotated[float, typer.Option(help="Seconds a request may take from arrival, queue included (then 503).", rich_help_panel=_L)] = _SL.timeout,
    queue_size: Annotated[int, typer.Option(help="Requests that may wait while --max-batch run (then 429).", rich_help_panel=_L)] = _SL.queue_size,
    max_batch: Annotated[int, typer.Option(help="Requests searching together: a request that arrives joins the running batch at the next step (1: one at a time).", rich_help_panel=_L)] = _SL.max_batch,
    prefix_cache_mb: Annotated[float, typer.Option(help="MiB of recent prompts' KV caches kept, so a prompt that opens like an earlier one (chat template, instruction) reads only its rest (0: off).", rich_help_panel=_V)] = _SL.prefix_cache_mb,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body (then 413).", rich_help_panel=_L)] = _SL.max_body_bytes,
    max_connections: Annotated[int, typer.Option(help="Open connections uvicorn accepts (then 503).", rich_help_panel=_L)] = _SL.max_connections,
    allow_regex: Annotated[bool, typer.Option("--allow-regex/--no-allow-regex", help="Accept must_match / must_not_match (they run the client's regular expressions).", rich_help_panel=_L)] = _SL.allow_regex,
    rewards: Annotated[str, typer.Option(help="Named model rewards requests may use: all, none, or NAME,NAME (each loads its model on first use).", rich_help_panel=_L)] = _SL.rewards,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models, /health)."""
    with reported_errors():
        try:
            from ..server.app import check_address, serve as run_server
        except ImportError as exc:
            raise ModelLoadError(f"dealign serve needs FastAPI and uvicorn ({exc}); run `pip install 'dealign[server]'`") from None
        limits = ServerLimits(max_tokens=max_tokens, max_candidates=max_candidates, max_prompt_tokens=max_prompt_tokens,
                              timeout=timeout, queue_size=queue_size, max_batch=max_batch, prefix_cache_mb=prefix_cache_mb,
                              max_body_bytes=max_body_bytes,
                              max_connections=max_connections, allow_regex=allow_regex, rewards=rewards)
        limits.offered_rewards()  # an unknown name fails here, before the model loads
        check_address(host, port)  # and so does a port in use
        _set_threads(threads)
        aligner = AlignerSpec(model, draft_model=draft_model, dtype=dtype, device=device).build()
        run_server(aligner, limits, host=host, port=port, model_name=model_name or _served_name(model), log_level=log_level)


@app.command()
def explore(
    model: Annotated[Optional[str], typer.Option(help="Packaged model name, HF folder, .gguf file or cached hub id [default: packaged SmolLM2-135M-Instruct].")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: a free one).")] = 0,
    browser: Annotated[bool, typer.Option("--browser/--no-browser", help="Open the page in the default web browser.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds one search may take (a wide 64-token DeAL search on 2 CPU cores takes minutes).")] = 600.0,
    max_tokens: Annotated[int, typer.Option(help="Largest max_tokens the page may ask for.")] = _SL.max_tokens,
    max_candidates: Annotated[int, typer.Option(help="Largest search width: beam x topk x max(1, lookahead).")] = _SL.max_candidates,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads for the search [default: torch's choice].")] = None,
) -> None:
    """Open the explorer: a page that runs greedy and DeAL side by side on the model and plays the search back step by step (`dealign serve` with the page at /)."""
    with reported_errors():
        try:
            from ..server.app import serve as run_server
        except ImportError as exc:
            raise ModelLoadError(f"dealign explore needs FastAPI and uvicorn ({exc}); run `pip install 'dealign[server]'`") from None
        limits = ServerLimits(timeout=timeout, max_tokens=max_tokens, max_candidates=max_candidates)
        _set_threads(threads)
        aligner = AlignerSpec(model).build()

        def ready(url: str) -> None:
            typer.echo(f"the explorer is at {url} (Ctrl+C stops it)")
            if browser:
                import webbrowser

                webbrowser.open(url)

        run_server(aligner, limits, host=host, port=port, model_name=_served_name(model), log_level="warning",
                   on_ready=ready)


def _set_threads(threads: Optional[int]) -> None:
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads must be >= 1; got {threads}")
        import torch

        torch.set_num_threads(threads)


def _served_name(model: Optional[str]) -> str:
    if not model:
        return "smollm2"
    path = Path(model)
    if path.exists():
        return path.stem if path.is_file() else path.resolve().name
    return model


if __name__ == "__main__":  # pragma: no cover
    app(prog_name="dealign")
