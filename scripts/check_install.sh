#!/usr/bin/env bash
# Builds palmkit's wheel and sdist, then installs the wheel into a fresh environment that already holds an
# in-range transformers other than the lock's (as a user's environment would), checks that pip keeps it and that
# `pip check` is clean, and runs a smoke job from that install: `palmkit info`, a corpus and tokenizer from a small
# text file, a few pretraining steps, generation. Usage: bash scripts/check_install.sh [WORK_DIR]
# TRANSFORMERS (default 5.20.0) picks the user's transformers; PYTHON the interpreter (default python3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=${1:-$(mktemp -d -t palmkit-install.XXXXXX)}
mkdir -p "$work"
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
users_transformers=${TRANSFORMERS:-5.20.0}
lock_transformers=$(sed -n 's/^transformers==//p' constraints.txt)
[ "$users_transformers" != "$lock_transformers" ] || { echo "TRANSFORMERS must differ from the lock's $lock_transformers"; exit 1; }

echo "== build: wheel and sdist"
"$py" -m venv "$work/build-env"
"$work/build-env/bin/python" -m pip install -q build
rm -rf "$work/dist"
"$work/build-env/bin/python" -m build --outdir "$work/dist" "$root" > "$work/build.log" 2>&1 || { tail -n 20 "$work/build.log"; exit 1; }
wheel=$(ls "$work"/dist/palmkit-*.whl)
sdist=$(ls "$work"/dist/palmkit-*.tar.gz)
echo "   $(basename "$wheel"), $(basename "$sdist")"
# The sdist must build the same wheel (same files): a missing MANIFEST entry would show here.
"$work/build-env/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$work/from-sdist" "$sdist" >/dev/null 2>&1 \
  || "$work/build-env/bin/python" -m pip wheel -q --no-deps -w "$work/from-sdist" "$sdist" >/dev/null
diff <(unzip -Z1 "$wheel" | grep -v 'dist-info/RECORD' | sort) \
     <(unzip -Z1 "$work"/from-sdist/palmkit-*.whl | grep -v 'dist-info/RECORD' | sort) \
  || { echo "the sdist builds a wheel with other files than the wheel's"; exit 1; }

# Python 3.12 and 3.13: palmkit's ranges resolve to binary wheels there (a dry run reads the packages' metadata; CI's
# torch file is for 3.11 only, so nothing is installed)
for minor in 3.12 3.13; do
  newer=
  for candidate in $(ls "$HOME"/.pyenv/versions/"$minor".*/bin/python 2>/dev/null) "python$minor"; do
    "$candidate" -c '' 2>/dev/null && { newer=$candidate; break; }
  done
  [ -n "$newer" ] || { echo "   (python$minor not found: its resolution is not checked)"; continue; }
  "$newer" -m venv "$work/py$minor"
  "$work/py$minor/bin/python" -m pip install -q --dry-run --only-binary :all: "$wheel" > "$work/py$minor.log" 2>&1 \
    || { grep -v "is ignored" "$work/py$minor.log" | tail -n 5; echo "palmkit's dependencies do not resolve to wheels on Python $minor"; exit 1; }
  echo "   Python $minor: every dependency resolves to a wheel"
done

echo "== a user's environment: torch 2.13.0 and transformers $users_transformers already installed"
rm -rf "$work/user-env"
"$py" -m venv "$work/user-env"
pip=("$work/user-env/bin/python" -m pip)
"${pip[@]}" install -q torch==2.13.0 "transformers==$users_transformers"
echo "== pip install palmkit (the wheel, no constraints: pip resolves palmkit's ranges against what is there)"
"${pip[@]}" install -q "$wheel"
got=$("$work/user-env/bin/python" -c 'import transformers; print(transformers.__version__)')
[ "$got" = "$users_transformers" ] || { echo "installing palmkit replaced transformers $users_transformers with $got"; exit 1; }
"${pip[@]}" check
echo "== smoke run from the installed package"
cd "$work"
palmkit=$work/user-env/bin/palmkit
"$palmkit" --version
"$palmkit" info --preset mini > info.txt && head -n 3 info.txt
# real English text that every Python ships: the docstrings of the standard library
"$work/user-env/bin/python" - <<'PY' > texts.jsonl
import importlib, inspect, json
seen = set()
for name in ("email", "http.server", "json", "logging", "pathlib", "statistics", "textwrap", "unittest", "urllib.request"):
    for _, obj in inspect.getmembers(importlib.import_module(name)):
        doc = inspect.getdoc(obj) or ""
        if len(doc) > 200 and doc not in seen:
            seen.add(doc)
            print(json.dumps({"text": doc}))
PY
"$palmkit" corpus build --out corpus --subset none --inputs texts.jsonl --lang en --tokenizer.vocab_size 1000 --run.workers 1 > corpus.log 2>&1 \
  || { tail -n 20 corpus.log; exit 1; }
"$palmkit" pretrain --data corpus --out run --train.preset tiny --train.max_steps 3 --train.seq_len 64 \
  --train.batch_tokens 512 --train.eval_every 3 --train.save_every 3 --train.compile false > pretrain.log 2>&1 \
  || { tail -n 20 pretrain.log; exit 1; }
"$palmkit" generate --checkpoint run/final --prompt "The" --sampling.max_new_tokens 8 | tail -n 2
echo "install check passed: wheel and sdist, transformers $users_transformers kept, pip check clean, smoke run done"
