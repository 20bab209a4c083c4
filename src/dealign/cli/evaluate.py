"""``dealign eval TASK``: build the task's batch input, answer it with the batch CLI path in one run
(resumable), then write and print the summary table."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

from .options import Settings, UsageError

TASKS = ("keywords",)


def run_eval(task: str, *, n: int, strategies: list[str], out: Path, model: str | None, max_new_tokens: int,
             offset: int = 0, resume: bool = True) -> list[dict]:
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}; available: {', '.join(TASKS)}")
    from ..evaluation import keywords as kw
    from .batch import run_batch
    from .loading import load_aligner

    out.mkdir(parents=True, exist_ok=True)
    rows = kw.input_rows(n, strategies, max_new_tokens=max_new_tokens, offset=offset)
    inp, outp = out / "input.jsonl", out / "output.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    aligner = None

    def load():
        nonlocal aligner
        aligner = aligner or load_aligner(model)
        return aligner

    run_batch(inp, outp, Settings.from_values({}), load, resume=resume)
    from ..evaluation.metrics import mean_token_nll

    answers = [json.loads(line) for line in outp.read_text(encoding="utf-8").splitlines() if line.strip()]
    print("scoring fluency (NLL under the model) ...", file=sys.stderr)
    judge = load()
    table = kw.summarize(answers, nll=lambda p, t: mean_token_nll(judge, p, t))
    import torch

    import dealign
    import transformers

    header = (
        f"task: {task} · data: CommonGen dev rows {offset}..{offset + n - 1} · model: {model or 'smollm2 (default)'} · "
        f"max new tokens: {max_new_tokens} · dealign {dealign.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {platform.machine()} with {torch.get_num_threads()} threads"
    )
    md = header + "\n\n" + kw.markdown(table) + "\n"
    (out / "summary.md").write_text(md, encoding="utf-8")
    (out / "summary.json").write_text(json.dumps({"header": header, "table": table}, indent=2), encoding="utf-8")
    print(md)
    return table
