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
# groff renders the man pages of the built-in corpus (palmkit corpus build); without it a simpler roff
# stripper is used. groff-base is the small Debian package that has groff -Tutf8.
if ! command -v groff >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q groff-base >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q groff-base >/dev/null; } \
    || echo "note: could not install groff-base; man pages will be read with palmkit's roff stripper"
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
echo "palmkit installed: $(.venv/bin/palmkit --help >/dev/null && echo ok) (.venv/bin/palmkit)"
