#!/usr/bin/env bash
# Sets up palmkit in ./.venv (Python 3.11): the package, its dependencies and the test extras at the exact versions
# of the lock (constraints.txt, written by scripts/lock.sh). Safe to re-run. torch==2.13.0 is the CPU wheel that pip
# finds on this machine's disk. To add palmkit to an environment of your own instead: pip install palmkit (README).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# debian_packages NOTE PACKAGE...: apt-get install PACKAGEs (as root, where apt-get exists), printing NOTE if that fails.
debian_packages() {
  local note=$1
  shift
  command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] || { echo "note: $* not installed (needs root and apt-get): $note"; return 0; }
  apt-get install -y -q "$@" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "$@" >/dev/null; } \
    || echo "note: could not install $*; $note"
}
# groff renders the man pages of the built-in corpus (palmkit corpus build); without it a simpler roff
# stripper is used. groff-base is the small Debian package that has groff -Tutf8.
command -v groff >/dev/null || debian_packages "man pages will be read with palmkit's roff stripper" groff-base
# Headless Chromium and its driver run the web chat page's browser test (tests/serve/test_app.py); Selenium is
# pointed at these system binaries, so nothing downloads a browser.
{ command -v chromium && command -v chromedriver; } >/dev/null \
  || debian_packages "the browser test fails until chromium and chromium-driver are installed" chromium chromium-driver
# cmake, ninja and g++ build llama.cpp, the reference runtime of the GGUF export (python -m palmkit.model.llamacpp)
{ command -v cmake && command -v ninja && command -v g++; } >/dev/null \
  || debian_packages "the llama.cpp tests are skipped until cmake, ninja-build and g++ are installed" cmake ninja-build g++
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
echo "$(.venv/bin/palmkit --version) installed: .venv/bin/palmkit (palmkit --help lists the commands)"
