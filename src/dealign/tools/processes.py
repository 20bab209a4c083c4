"""Small helpers for the tools that start and watch processes: a free loopback port, stopping a
child, and resident memory read from Linux's /proc (sampled in a thread for the peak)."""

from __future__ import annotations

import ctypes
import gc
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, grace: float) -> None:
    """Terminate ``proc`` if it still runs; kill it if it has not exited after ``grace`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rss_mib(pid: int | str | None = "self") -> float | None:
    """Resident memory of process ``pid`` (this one by default) in MiB; None for no pid or where
    /proc cannot be read."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc), so a measurement starts from a true base."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """The peak resident memory of a process while a ``with`` block runs, sampled every ``every``
    seconds in a thread (and on entry and exit).  ``base`` is the RSS on entry, ``peak`` the highest
    seen, ``growth`` the difference, all in MiB (0 where /proc cannot be read).  ``release`` first
    returns this process's freed heap to the OS, for a base that does not count garbage."""

    def __init__(self, pid: int | str | None = "self", *, every: float = 0.005, release: bool = False) -> None:
        self.pid, self.every, self.release = pid, every, release
        self.base = self.peak = 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        self.peak = max(self.peak, rss_mib(self.pid) or 0.0)

    def _watch(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self) -> "PeakRSS":
        if self.release:
            release_freed_memory()
        self.base = self.peak = rss_mib(self.pid) or 0.0
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def growth(self) -> float:
        return self.peak - self.base
