#!/usr/bin/env bash
# Writes constraints.txt, the lock: the exact version of every package that palmkit and its test extra install,
# which install.sh and CI install from, so that the two README commands give the same environment on every
# machine. pyproject.toml keeps ranges, so that palmkit installs beside a user's own packages.
#   bash scripts/lock.sh            keep the locked versions, add what a new or changed range needs
#   bash scripts/lock.sh --upgrade  the newest version of everything within pyproject's ranges
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
env=$(mktemp -d -t palmkit-lock.XXXXXX)
trap 'rm -rf "$env"' EXIT
"$py" -m venv "$env"
keep=()
if [ "${1:-}" != "--upgrade" ] && [ -f constraints.txt ]; then
  # a locked version that no longer fits a range is dropped, so pip picks one that does
  keep=(-c constraints.txt)
fi
# (this machine's pip.conf names local indexes that may be absent: pip warns once per package, which says nothing)
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
quiet "$env/bin/python" -m pip install -q --upgrade pip
quiet "$env/bin/python" -m pip install -q "${keep[@]}" -e ".[test]"
{
  echo "# palmkit's lock: written by scripts/lock.sh from pyproject.toml's ranges; install.sh and CI install with"
  echo "# pip install -c constraints.txt -e \".[test]\". Python $("$env/bin/python" -c 'import platform; print(platform.python_version())'), Linux x86_64."
  # torch's local label (+cpu) names the wheel on this machine's disk; the version is what the lock fixes
  "$env/bin/python" -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/' | LC_ALL=C sort -f
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt: $(grep -c '==' constraints.txt) packages"
