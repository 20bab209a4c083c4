"""``dealign bench``: what DeAL costs, measured in one process and one run.

On the default model and a fixed set of CommonGen prompts it times greedy decoding (our backend and
plain ``transformers`` ``generate()``), the naive DeAL reference (no KV cache, every candidate's
lookahead re-encoded one row at a time: the correctness oracle, not a user option), and our DeAL at a
few settings.  Per configuration it reports seconds per prompt, generated tokens, sequential forward
passes, tokens processed by the model, peak memory, the ratio to greedy and keyword coverage, so a
speed-up is never bought with a silent loss of quality; optimised and naive DeAL must return the same
tokens.  ``python -m dealign.tools.bench`` runs the same.
"""

from __future__ import annotations

import json
import os
import platform
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import transformers

from .. import __version__
from ..api import Aligner, load_tokenizer
from ..backends.hf import NaiveHFBackend
from ..backends.remote import RemoteBackend
from ..evaluation.data import commongen
from ..evaluation.table import markdown_table
from ..evaluation.tasks import KEYWORDS
from ..rewards import keywords
from ..search import SearchConfig, run_search
from ..models.loading import ALIASES, PACKAGED, packaged_gguf
from .llama_server import LlamaServer
from .processes import PeakRSS

PAPERLIKE = dict(beam=4, topk=8, lookahead=8)  # the reference setting: beam 4, top-k 8, lookahead 8


@dataclass
class BenchConfig:
    name: str
    search: SearchConfig | None  # None: transformers generate()
    naive: bool = False
    note: str = ""
    dtype: str = "float32"
    remote: bool = False  # run on the remote engine (run_bench's ``remote``) instead of the local model


def remote_configs(max_new_tokens: int) -> list[BenchConfig]:
    """The remote engine's rows, each the twin of a local row (same search, same prompts)."""
    base = SearchConfig(max_new_tokens=max_new_tokens)
    return [
        BenchConfig("remote greedy", base.replace(strategy="greedy"), remote=True),
        BenchConfig("remote deal token default", base, remote=True, note="b4 k4 l1 lam20"),
        BenchConfig("remote deal segment b4 k4 l4", base.replace(mode="segment", lookahead=4), remote=True),
    ]


def default_configs(max_new_tokens: int) -> list[BenchConfig]:
    base = SearchConfig(max_new_tokens=max_new_tokens)
    return [
        BenchConfig("greedy", base.replace(strategy="greedy"), note="our backend"),
        BenchConfig("greedy (transformers)", None, note="model.generate(do_sample=False)"),
        BenchConfig("deal naive b4 k8 l8", base.replace(**PAPERLIKE), naive=True, note="reference, no cache"),
        BenchConfig("deal token b4 k8 l8", base.replace(**PAPERLIKE)),
        BenchConfig("deal token b4 k4 l2", base.replace(lookahead=2)),
        BenchConfig("deal token default", base, note="b4 k4 l1 lam20"),
        BenchConfig("deal segment b4 k4 l4", base.replace(mode="segment", lookahead=4)),
        BenchConfig("best-of-8", base.replace(strategy="best-of-n", n=8)),
        BenchConfig("greedy bf16", base.replace(strategy="greedy"), dtype="bfloat16", note="bfloat16 weights"),
        BenchConfig("deal token default bf16", base, dtype="bfloat16", note="bfloat16 weights"),
    ]


@dataclass
class Row:
    name: str
    note: str
    prompts: int
    seconds_per_prompt: float
    tokens: float
    forward_passes: float
    tokens_processed: float
    peak_mib: float
    soft: float
    hard_finished: float
    finished: float
    x_greedy: float = float("nan")
    requests: float = float("nan")  # HTTP requests per prompt (remote rows)
    outputs: list[list[int]] = field(default_factory=list)


def _hf_generate(aligner, ids: list[int], max_new_tokens: int) -> tuple[list[int], dict]:
    model, tok = aligner.backend.model, aligner.tokenizer
    x = torch.tensor([ids], device=aligner.backend.device)
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    gen = out[0, len(ids):].tolist()
    eos = aligner.backend.eos_ids
    cut = next((i + 1 for i, t in enumerate(gen) if t in eos), len(gen))
    return gen[:cut], {"forward_passes": cut, "tokens_processed": len(ids) + cut - 1}


def run_config(aligner, bc: BenchConfig, items, max_new_tokens: int, remote=None) -> Row:
    backend = NaiveHFBackend(aligner.backend.model, aligner.tokenizer) if bc.naive else aligner.backend
    if bc.remote:
        backend = remote
        requests_before = remote.counters.requests
    secs, toks, fps, tps, soft, hard, fin, outs = [], [], [], [], [], [], [], []
    prefixes = getattr(backend, "prefixes", None)
    if prefixes is not None:  # every row reads its prompts afresh: no row gains from an earlier one's
        prefixes.clear()
    with PeakRSS(release=True) as mem:
        for cs in items:
            ids, user = aligner.encode_prompt(cs.prompt)
            start = time.perf_counter()
            if bc.search is None:
                out, st = _hf_generate(aligner, ids, max_new_tokens)
            else:
                res = run_search(backend, ids, keywords(cs.keywords), bc.search, prompt_text=user)
                out = res.best.token_ids
                st = {"forward_passes": res.stats.forward_passes, "tokens_processed": res.stats.tokens_processed}
            secs.append(time.perf_counter() - start)
            done = bool(out) and out[-1] in aligner.backend.eos_ids
            m = KEYWORDS.metrics({"text": aligner.backend.decode(out), "keywords": cs.keywords, "finished": done})
            toks.append(len(out)); fps.append(st["forward_passes"]); tps.append(st["tokens_processed"])
            soft.append(m["soft"]); hard.append(m["hard_finished"]); fin.append(float(done)); outs.append(out)
    n = len(items)
    row = Row(bc.name, bc.note, n, sum(secs) / n, sum(toks) / n, sum(fps) / n, sum(tps) / n, mem.growth,
              sum(soft) / n, sum(hard) / n, sum(fin) / n, outputs=outs)
    if bc.remote:
        row.requests = (remote.counters.requests - requests_before) / n
    return row


def run_bench(model: str | None = None, *, prompts: int = 10, naive_prompts: int = 2, max_new_tokens: int = 32,
              configs: list[BenchConfig] | None = None, progress: Callable[[str], None] = print,
              remote: str | None = None, remote_dialect: str = "llamacpp", remote_threads: int = 1) -> dict:
    """Run every configuration; naive ones on the first ``naive_prompts`` prompts only (they are slow;
    0 leaves them out), and their optimised twins are checked token for token on those prompts.

    ``remote`` adds the remote backend's rows (:func:`remote_configs`): an engine URL serving the same
    model (``remote_dialect``), or ``"auto"`` to start the built ``llama-server`` on the packaged GGUF
    with ``remote_threads`` threads.  Each remote row is compared token for token with its local twin."""
    for what, value, least in (("prompts", prompts, 1), ("naive_prompts", naive_prompts, 0), ("max_new_tokens", max_new_tokens, 1)):
        if value < least:
            raise ValueError(f"{what} must be >= {least}, got {value}")
    with ExitStack() as stack:
        engine = None
        if remote is not None:
            engine = _remote_engine(stack, remote, remote_dialect, model, remote_threads, progress)
        return _run_bench(model, prompts, naive_prompts, max_new_tokens, configs, progress, engine)


def _remote_engine(stack, remote: str, dialect: str, model: str | None, threads: int, progress):
    """Connect to ``remote`` (or start llama-server for ``"auto"``) with the policy's tokenizer."""
    if remote == "auto":
        key = ALIASES.get((model or "smollm2").lower(), (model or "smollm2").lower())
        gguf = packaged_gguf(key) if key in PACKAGED else Path(model)
        if gguf.suffix != ".gguf":
            raise ValueError("--remote auto starts llama-server on a GGUF file: give a packaged model or a .gguf --model")
        progress(f"starting llama-server on {gguf.name} ({threads} threads) ...")
        remote, dialect = stack.enter_context(LlamaServer(gguf, threads=threads, parallel=16, ctx_per_slot=512)).url, "llamacpp"
    tok, eos = load_tokenizer(model)
    backend = RemoteBackend(remote, tok, dialect=dialect, eos_ids=eos, top_n=20)
    stack.callback(backend.close)
    return backend


def _run_bench(model, prompts, naive_prompts, max_new_tokens, configs, progress, engine) -> dict:
    aligners: dict[str, Aligner] = {}

    def aligner_for(dtype: str) -> Aligner:
        if dtype not in aligners:
            aligners[dtype] = Aligner.from_pretrained(model, dtype=dtype)
            warm = BenchConfig("warm-up", SearchConfig(strategy="greedy", max_new_tokens=4))
            run_config(aligners[dtype], warm, items[:1], 4)
        return aligners[dtype]

    items = commongen(prompts)
    configs = configs or default_configs(max_new_tokens) + (remote_configs(max_new_tokens) if engine else [])
    configs = [c for c in configs if naive_prompts or not c.naive]
    aligner = aligner_for("float32")
    rows: list[Row] = []
    for bc in configs:
        subset = items[:naive_prompts] if bc.naive else items
        progress(f"running {bc.name} on {len(subset)} prompts ...")
        rows.append(run_config(aligner_for(bc.dtype), bc, subset, max_new_tokens, remote=engine))
    # each row against our greedy decoding at the same precision (the fair baseline for that row)
    greedy = {c.dtype: r for c, r in zip(configs, rows)
              if c.search is not None and c.search.strategy == "greedy" and not c.remote}
    for c, r in zip(configs, rows):
        base = greedy.get(c.dtype) or greedy.get("float32")
        r.x_greedy = r.seconds_per_prompt / base.seconds_per_prompt if base else float("nan")
    checks = []
    for bc, r in zip(configs, rows):  # remote rows against their local twins: same tokens?
        twin = next((o for c, o in zip(configs, rows) if not c.remote and not c.naive and c.search == bc.search
                     and c.dtype == bc.dtype), None) if bc.remote else None
        if twin is not None:
            same = [a == b for a, b in zip(r.outputs, twin.outputs)]
            checks.append({"remote": r.name, "local": twin.name, "prompts": len(same), "identical": sum(same),
                           "remote_seconds_per_prompt": r.seconds_per_prompt,
                           "local_seconds_per_prompt": twin.seconds_per_prompt})
    for bc, r in zip(configs, rows):
        if not bc.naive:
            continue
        twin = next((o for c, o in zip(configs, rows) if not c.naive and not c.remote and c.search == bc.search and c.dtype == bc.dtype),
                    None)
        if twin is not None:
            n = len(r.outputs)
            same = twin.outputs[:n] == r.outputs
            # the twin's time on the same prompts, for the speed-up at identical outputs
            twin_cfg = BenchConfig(twin.name, bc.search)
            again = run_config(aligner, twin_cfg, items[:n], max_new_tokens)
            checks.append({"naive": r.name, "optimised": twin.name, "prompts": n, "identical_tokens": same,
                           "speedup": r.seconds_per_prompt / again.seconds_per_prompt,
                           "naive_forward_passes": r.forward_passes, "optimised_forward_passes": again.forward_passes})
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "versions": {"dealign": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "model": model or "smollm2 (default)",
        "remote": (f"{engine.dialect.name} at {engine.url}" if engine else None),
        "data": f"CommonGen dev, first {prompts} concept sets (naive reference: first {naive_prompts})",
        "max_new_tokens": max_new_tokens,
        "rows": [{k: v for k, v in asdict(r).items() if k != "outputs"} for r in rows],
        "equivalence": checks,
    }


COLUMNS = [("name", "configuration", "{}"), ("prompts", "prompts", "{}"), ("seconds_per_prompt", "s/prompt", "{:.2f}"),
           ("x_greedy", "× greedy", "{:.2f}"), ("tokens", "tokens", "{:.1f}"), ("forward_passes", "forward passes", "{:.1f}"),
           ("tokens_processed", "tokens processed", "{:.0f}"), ("peak_mib", "peak MiB", "{:.0f}"),
           ("soft", "soft cov.", "{:.2f}"), ("hard_finished", "hard cov. (finished)", "{:.2f}")]


def markdown(report: dict) -> str:
    formats = {k: f for k, _, f in COLUMNS}
    lines = [markdown_table(report["rows"], list(formats), headers={k: h for k, h, _ in COLUMNS},
                            cell=lambda k, v: formats[k].format(v))]
    if any(r.get("requests", float("nan")) == r.get("requests", float("nan")) for r in report["rows"]):
        lines.append(f"\nremote rows: {report.get('remote')}; HTTP requests per prompt: " + ", ".join(
            f"{r['name']} {r['requests']:.0f}" for r in report["rows"] if r["requests"] == r["requests"]))
    for c in report["equivalence"]:
        if "remote" in c:
            lines.append(f"\n{c['remote']} vs {c['local']}: identical tokens on {c['identical']}/{c['prompts']} prompts")
            continue
        lines.append(
            f"\n{c['optimised']} vs {c['naive']} on {c['prompts']} prompts: identical tokens: "
            f"{'yes' if c['identical_tokens'] else 'NO'}; {c['speedup']:.1f}× faster "
            f"({c['optimised_forward_passes']:.0f} vs {c['naive_forward_passes']:.0f} forward passes per prompt)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m dealign.tools.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--prompts", type=int, default=10)
    p.add_argument("--naive-prompts", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--json-out", type=Path, default=Path("runs/bench.json"))
    p.add_argument("--remote", default=None, help="engine URL for the remote rows, or 'auto' to start llama-server")
    p.add_argument("--remote-dialect", default="llamacpp", choices=["llamacpp", "vllm"])
    a = p.parse_args(argv)
    report = run_bench(a.model, prompts=a.prompts, naive_prompts=a.naive_prompts, max_new_tokens=a.max_new_tokens,
                       remote=a.remote, remote_dialect=a.remote_dialect)
    a.json_out.parent.mkdir(parents=True, exist_ok=True)
    a.json_out.write_text(json.dumps(report, indent=2))
    print(markdown(report))
    print(f"\nwritten to {a.json_out}")


if __name__ == "__main__":
    main()


def run_format_cost(model: str | None = None, *, prompts: int = 4, max_new_tokens: int = 64,
                    progress: Callable[[str], None] = print) -> dict:
    """What the JSON-schema mask costs: greedy and DeAL on the ``format`` task's prompts with and
    without the schema (same settings), seconds per answer, generated tokens per second, and the mask's
    own time (computing llguidance's bitmask and applying it) next to the forward passes."""
    from ..evaluation.format import items as format_items

    aligner = Aligner.from_pretrained(model)
    rows_in = format_items()[:prompts]
    aligner.generate("warm up", strategy="greedy", max_new_tokens=4, json_schema=rows_in[0][2])
    searches = {"greedy": {"strategy": "greedy"},
                "deal token b4 k4 l1": {"strategy": "deal"},
                "deal segment b2 k3 l2": {"strategy": "deal", "mode": "segment", "beam": 2, "topk": 3, "lookahead": 2}}
    rows = []
    for name, search in searches.items():
        for masked in (False, True):
            progress(f"running {name} {'with' if masked else 'without'} the schema on {len(rows_in)} prompts ...")
            secs = toks = mask = fps = 0.0
            for _, prompt, schema, kw in rows_in:
                start = time.perf_counter()
                res = aligner.generate(prompt, reward=keywords(kw), max_new_tokens=max_new_tokens, **search,
                                       **({"json_schema": schema} if masked else {}))
                secs += time.perf_counter() - start
                toks += res.num_tokens
                fps += res.stats["forward_passes"]
                mask += res.stats.get("constraint", {}).get("mask_seconds", 0.0)
            n = len(rows_in)
            rows.append({"name": name, "schema": masked, "seconds_per_answer": secs / n, "tokens": toks / n,
                         "tokens_per_second": toks / secs, "seconds_per_forward": secs / fps,
                         "mask_seconds_per_answer": mask / n, "mask_share": mask / secs})
    for r in rows:
        if r["schema"]:
            free = next(o for o in rows if o["name"] == r["name"] and not o["schema"])
            # per generated token: the answers differ in length (the schema's answer is JSON)
            r["x_unconstrained_per_token"] = free["tokens_per_second"] / r["tokens_per_second"]
            r["x_unconstrained_per_forward"] = r["seconds_per_forward"] / free["seconds_per_forward"]
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
            "model": model or "smollm2 (default)", "prompts": len(rows_in), "max_new_tokens": max_new_tokens,
            "rows": rows}


def format_cost_markdown(report: dict) -> str:
    cols = ["name", "schema", "seconds_per_answer", "tokens", "tokens_per_second", "seconds_per_forward",
            "mask_seconds_per_answer", "mask_share", "x_unconstrained_per_token", "x_unconstrained_per_forward"]
    fmt = lambda k, v: "–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    return markdown_table([{c: r.get(c) for c in cols} for r in report["rows"]], cols, cell=fmt)
