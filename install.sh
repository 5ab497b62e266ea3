#!/usr/bin/env bash
# Sets up palmkit in ./.venv (Python 3.11): the package, its pinned dependencies and the test extras.
# Safe to re-run. torch==2.13.0 is the CPU wheel that pip finds on this machine's disk.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
echo "palmkit installed: $(.venv/bin/palmkit --help >/dev/null && echo ok) (.venv/bin/palmkit)"
