"""Finding and starting llama.cpp's ``llama-server`` on loopback, for the tests and ``dealign bench``.

The binary is built once by ``scripts/build-llama-server.sh`` (``make test`` runs it) into
``<cache>/llama-server-<version>/llama-server``; ``DEALIGN_LLAMA_SERVER`` points at another one.
``LLAMA_CPP_PYTHON_VERSION`` below is the one pin of that version: the build script reads it from here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from ..models.loading import cache_dir
from .processes import free_port, stop

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the sdist whose vendored llama.cpp the build script compiles
BUILD_SCRIPT = "scripts/build-llama-server.sh"


def llama_server_binary() -> Path | None:
    """The built ``llama-server``, or None when it has not been built here."""
    env = os.environ.get("DEALIGN_LLAMA_SERVER")
    if env:
        return Path(env) if Path(env).is_file() else None
    path = cache_dir() / f"llama-server-{LLAMA_CPP_PYTHON_VERSION}" / "llama-server"
    return path if path.is_file() else None


def missing_build_tools() -> list[str]:
    return [t for t in ("cmake", "make", "c++", "tar") if shutil.which(t) is None]


class LlamaServer:
    """``llama-server`` serving ``gguf`` on a free loopback port, for the life of a ``with`` block.

    ``parallel`` slots (``-np``) share a context of ``parallel * ctx_per_slot`` tokens; the server's
    log goes to a temporary file, quoted in the error when it does not come up.  One thread by default:
    on a busy 2-core machine two llama.cpp threads waiting on each other made a decode step 70-100x
    slower (7 ms -> 500-1000 ms per token for SmolLM2-135M)."""

    def __init__(self, gguf: str | os.PathLike, *, binary: str | os.PathLike | None = None, threads: int = 1,
                 parallel: int = 4, ctx_per_slot: int = 1024, startup_timeout: float = 120.0) -> None:
        found = binary or llama_server_binary()
        if found is None:
            raise FileNotFoundError(f"llama-server is not built; run {BUILD_SCRIPT} (or `make test`), "
                                    "or set DEALIGN_LLAMA_SERVER to a llama-server binary")
        self.binary, self.gguf = Path(found), Path(gguf)
        self.threads, self.parallel, self.ctx = threads, parallel, ctx_per_slot
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "LlamaServer":
        self.log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)
        cmd = [str(self.binary), "-m", str(self.gguf), "--host", "127.0.0.1", "--port", str(self.port),
               "-t", str(self.threads), "-tb", str(self.threads), "-np", str(self.parallel),
               "-c", str(self.parallel * self.ctx), "--no-warmup"]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__()
        tail = Path(self.log.name).read_text(errors="replace")[-2000:]
        raise RuntimeError(f"llama-server did not come up on {self.url} ({' '.join(cmd)}):\n{tail}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop(self.proc, grace=10)
        self.proc = None
