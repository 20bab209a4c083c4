"""Which thread's torch ops use the CPU cores: the thread that runs the forward passes, alone.

Why: torch's CPU kernels run on OpenMP, and GNU OpenMP (the ``libgomp`` in torch's wheels) gives
every thread that starts a parallel region a team of worker threads of its own.  Once the process
holds more such threads than cores, libgomp stops its workers spinning between parallel regions
(its "throttled" spin count) and they sleep and wake on a futex instead, hundreds of times per
forward.  A lock-step batch runs forwards in one thread while its searches' threads do small tensor
work of their own (a top-k over a row of log-probs, a sum), and one such op above torch's grain size
is enough: measured on this project's 2-core machine, a SmolLM2 step over 16 rows went from 98 ms at
199 % CPU to 146 ms at 139 % once three other threads had each run one ``topk`` over ``[16, 49152]``.

So a search thread that hands its forwards to another thread runs its own torch ops on one core
(``serial_thread``), and a thread that hands the cores over for good (a server's main thread, which
loaded the model) lets its team go (``release_team``).  Both are no-ops where torch does not use
libgomp.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

OMP_PAUSE_HARD = 2


@functools.lru_cache(maxsize=1)
def _libgomp() -> Any | None:
    """The libgomp torch loaded (found in this process's memory map), or None."""
    import torch  # noqa: F401 - loads torch's OpenMP runtime first

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line and "/" in line}
    except OSError:  # not Linux
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if hasattr(lib, "omp_set_num_threads"):
            return lib
    return None


def serial_thread() -> None:
    """Run the calling thread's torch ops on one core, with no OpenMP team of its own (other
    threads keep theirs).  For a thread whose forward passes another thread runs."""
    import torch

    lib = _libgomp()
    if lib is None:
        return
    torch.get_num_threads()  # torch sets a thread's OpenMP width on its first op: let it do so now,
    lib.omp_set_num_threads(1)  # so that this, which only sets the calling thread's, is not undone


def release_team() -> None:
    """Let the calling thread's OpenMP worker threads go (they come back if it computes again):
    for a thread that hands the forward passes to another, e.g. a server's main thread."""
    lib = _libgomp()
    if lib is not None and hasattr(lib, "omp_pause_resource_all"):
        lib.omp_pause_resource_all(OMP_PAUSE_HARD)
