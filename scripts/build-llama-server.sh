#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (CPU only) from the llama-cpp-python source distribution, once.
#
# Why from that sdist: it vendors a pinned llama.cpp (vendor/llama.cpp), is fetched with pip like every
# other dependency, and its version names the cache folder, so the binary is built once per machine.
# The tests of the remote backend drive this server with the packaged SmolLM2 GGUF.
#
#   scripts/build-llama-server.sh            # prints the binary's path (builds it if missing)
#
# The version is pinned in one place, LLAMA_CPP_PYTHON_VERSION in src/dealign/tools/llama_server.py (which
# also finds the built binary by it); this script reads it from there.
#
# Environment: DEALIGN_CACHE (cache root, default ~/.cache/dealign), LLAMA_CPP_PYTHON_VERSION (overrides the pin),
# LLAMA_CPP_PYTHON_SDIST (a local copy of the .tar.gz, skips the download), PIP (pip to download with),
# BUILD_JOBS (default 2).
set -euo pipefail

PIN_FILE="$(dirname "$0")/../src/dealign/tools/llama_server.py"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-$(sed -n 's/^LLAMA_CPP_PYTHON_VERSION = "\([^"]*\)".*/\1/p' "$PIN_FILE")}"
[ -n "$VERSION" ] || { echo "build-llama-server: no LLAMA_CPP_PYTHON_VERSION pin found in $PIN_FILE" >&2; exit 1; }
CACHE="${DEALIGN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dealign}"
DEST="$CACHE/llama-server-$VERSION"
BIN="$DEST/llama-server"
JOBS="${BUILD_JOBS:-2}"

if [ -x "$BIN" ]; then
    echo "$BIN"
    exit 0
fi

for tool in cmake make c++ tar; do
    command -v "$tool" >/dev/null || { echo "build-llama-server: '$tool' is missing; install it (cmake >= 3.14, a C++17 compiler)" >&2; exit 2; }
done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/llama-server-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

SDIST="${LLAMA_CPP_PYTHON_SDIST:-}"
if [ -z "$SDIST" ]; then
    PIP="${PIP:-python3 -m pip}"
    $PIP download -q --no-deps --no-binary :all: -d "$WORK" "llama-cpp-python==$VERSION" >&2
    SDIST="$(ls "$WORK"/llama_cpp_python-*.tar.gz)"
fi
tar -xzf "$SDIST" -C "$WORK"
SRC="$(ls -d "$WORK"/llama_cpp_python-*/vendor/llama.cpp)"

start=$(date +%s)
# No web UI (it would be fetched from the network), no HTTPS/curl, no tests/examples: only the server.
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF >"$WORK/configure.log" 2>&1 \
    || { tail -40 "$WORK/configure.log" >&2; exit 1; }
cmake --build "$WORK/build" --target llama-server -j "$JOBS" >"$WORK/build.log" 2>&1 \
    || { tail -60 "$WORK/build.log" >&2; exit 1; }
mkdir -p "$DEST"
cp "$WORK/build/bin/llama-server" "$BIN.partial"
mv "$BIN.partial" "$BIN"
echo "build-llama-server: built in $(( $(date +%s) - start )) s" >&2
echo "$BIN"
