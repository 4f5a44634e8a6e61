#!/usr/bin/env bash
# Fresh-machine test run: a virtualenv with minikv (editable) and its test dependencies,
# then pytest. Extra arguments go to pytest (e.g. `bash tests/run.sh -m gpu`).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
# torch is a test-only reference. Pin the CPU build: an unpinned `torch` resolves to a
# multi-GB CUDA build. Skipped when a torch is already there (e.g. on the GPU machine).
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -c tests/constraints.txt -e ".[test]"
exec "$VENV/bin/python" -m pytest -q "$@"
