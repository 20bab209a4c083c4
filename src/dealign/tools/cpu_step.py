"""``dealign bench --suite cpu-step``: what one cached decode step costs on the CPU, by rows, under
the two settings that decide it -- the weights' memory layout (``models/layout.py``) and whether
other threads hold OpenMP teams (``backends/cpu_threads.py``) -- measured side by side in one process.

Why a suite of its own: both settings change how fast a forward over many rows runs without changing
what it computes, and both depend on the machine (its BLAS, its core count), so a user should be able
to see on their own machine what each buys.  Each figure is the median of ``repeats`` steps, the two
layouts interleaved step by step so drift in the machine's speed hits both alike.
"""

from __future__ import annotations

import copy
import statistics
import threading
import time
from typing import Any, Callable

import torch

from ..backends.cpu_threads import release_team, serial_thread
from ..models.layout import input_major
from ..models.loading import load

CONTEXT = 60  # tokens already in the cache: a chat prompt's worth


def _step_timer(model: Any, rows: int, context: int) -> Callable[[], float]:
    """A function that times one cached decode step over ``rows`` rows (a fresh copy of the same
    cache each time, so every step sees the same context)."""
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(rows)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (rows, context), generator=gen)
    tok = torch.randint(0, vocab, (rows, 1), generator=gen)
    with torch.inference_mode():
        base = model(input_ids=ids, use_cache=True).past_key_values

    def step() -> float:
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            for i, layer in enumerate(base.layers):
                cache.update(layer.keys.clone(), layer.values.clone(), i)
            start = time.perf_counter()
            model(input_ids=tok, cache=cache, use_cache=True)
            return time.perf_counter() - start

    return step


def _in_thread(fn: Callable[[], Any]) -> Any:
    out: dict[str, Any] = {}

    def run() -> None:
        out["value"] = fn()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return out["value"]


def _threads_rows(model: Any, rows: int, repeats: int, context: int, vocab: int) -> list[dict]:
    """One step over ``rows`` rows, run from a thread of its own (as a lock-step driver does) while
    three other threads, standing for searches, have run a top-k over a row block of log-probs: with
    OpenMP teams of their own (as before ``serial_thread``) or on one core each, and with the calling
    thread (which loaded the model) keeping its team or letting it go (``release_team``, as
    ``dealign serve`` does).  The last setting is what the library does now."""
    out = []
    for label, serial, release in (("searches with OpenMP teams, loading thread's team kept", False, False),
                                   ("searches serial, loading thread's team kept", True, False),
                                   ("searches serial, loading thread's team released", True, True)):
        if release:
            release_team()  # nothing in this thread computes after this
        hold = threading.Event()
        ready = threading.Barrier(4)

        def search_like() -> None:
            if serial:
                serial_thread()
            torch.randn(rows, vocab).topk(8, dim=-1)
            ready.wait()
            hold.wait()

        others = [threading.Thread(target=search_like, daemon=True) for _ in range(3)]
        for t in others:
            t.start()
        ready.wait()

        def timed() -> tuple[float, float]:
            step = _step_timer(model, rows, context)
            step()
            walls, cpu0, wall0 = [], time.process_time(), time.perf_counter()
            for _ in range(repeats):
                walls.append(step())
            return statistics.median(walls), (time.process_time() - cpu0) / (time.perf_counter() - wall0)

        wall, cpu = _in_thread(timed)
        hold.set()
        for t in others:
            t.join()
        out.append({"setting": label, "rows": rows, "ms": round(wall * 1000, 1), "cpu_use": round(cpu * 100)})
    return out


def run_cpu_step(model: str | None = None, *, rows: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64), repeats: int = 9,
                 context: int = CONTEXT, thread_rows: int = 16,
                 progress: Callable[[str], None] = lambda m: None) -> dict:
    """Both tables of the suite (see the module docstring) as a JSON-able report."""
    loaded = load(model)
    shipped = loaded.model  # input-major unless DEALIGN_WEIGHT_LAYOUT=as-loaded
    as_loaded = copy.deepcopy(shipped)
    for module in as_loaded.modules():  # back to the [out, in] storage nn.Linear loads with
        if isinstance(module, torch.nn.Linear):
            module.weight.data = module.weight.data.contiguous()
    input_major(shipped)
    layout = []
    for n in rows:
        progress(f"layouts: {n} rows")
        old, new = _step_timer(as_loaded, n, context), _step_timer(shipped, n, context)
        old(), new()
        a, b = [], []
        for _ in range(repeats):
            a.append(old())
            b.append(new())
        ms_old, ms_new = statistics.median(a) * 1000, statistics.median(b) * 1000
        layout.append({"rows": n, "as-loaded ms": round(ms_old, 1), "input-major ms": round(ms_new, 1),
                       "speed-up": round(ms_old / ms_new, 2)})
    del as_loaded
    progress(f"threads: {thread_rows} rows")
    vocab = shipped.config.vocab_size
    threads = _threads_rows(shipped, thread_rows, repeats, context, vocab)
    return {"model": loaded.source, "torch_threads": torch.get_num_threads(), "context": context,
            "repeats": repeats, "layout": layout, "threads": threads}


def markdown(report: dict) -> str:
    from ..evaluation.table import markdown_table

    head = (f"{report['model']}, {report['torch_threads']} torch threads, one cached decode step after "
            f"{report['context']} tokens, median of {report['repeats']}")
    return "\n\n".join([head, markdown_table(report["layout"]), markdown_table(report["threads"])])
