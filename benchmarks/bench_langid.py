"""Language identification of single documents: py3langid (what `--lang auto` uses) beside lingua, on real text.

The documents are up to 40 of each built-in source of the seven built-in languages, extracted and cleaned as the
build does (from the cache of `palmkit corpus fetch`). Each library labels every document; the table gives the
share labelled right, the time, and for py3langid at palmkit's settings (the first SAMPLE_CHARS characters, a
document below MIN_CONFIDENCE rejected) the share accepted and the share of those labelled right.

    pip install lingua-language-detector==2.1.1   # the peer (a 96 MB wheel; not a palmkit dependency)
    python benchmarks/bench_langid.py
"""

from __future__ import annotations

import argparse
import random
import time

from palmkit.data.corpus.extract import chunk_tasks, extract, source_files
from palmkit.data.corpus.langid import MIN_CONFIDENCE, SAMPLE_CHARS, identify
from palmkit.data.corpus.sources import DEFAULT_LANGS, select_sources
from palmkit.data.fetch import cache_dir, package_path


def documents(cache: str, per_source: int) -> list[tuple[str, str]]:
    docs = []
    for lang in DEFAULT_LANGS:
        for source in select_sources([lang], "full"):
            files = source_files(source, package_path(source.package, cache))
            random.Random(0).shuffle(files)
            for task in chunk_tasks(source.name, source.lang, source.reader, files[:60], source.filtered)[:1]:
                docs += [(lang, d) for d in extract(task)[0][:per_source]]
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default="", help="the corpus cache (default: palmkit's)")
    parser.add_argument("--per-source", type=int, default=40)
    args = parser.parse_args()
    docs = documents(str(cache_dir(args.cache)), args.per_source)
    print(f"{len(docs)} documents, {sum(len(d.encode()) for _, d in docs) / 1e6:.2f} MB")
    rows = []
    t = time.perf_counter()
    ours = [identify(d) for _, d in docs]
    rows.append((f"py3langid (first {SAMPLE_CHARS} characters)", sum(c == lang for (lang, _), (c, _) in
                                                                      zip(docs, ours, strict=True)),
                 time.perf_counter() - t))
    accepted = [(lang, c) for (lang, _), (c, p) in zip(docs, ours, strict=True) if p >= MIN_CONFIDENCE]
    try:
        from lingua import LanguageDetectorBuilder
    except ImportError:
        print("lingua is not installed: pip install lingua-language-detector==2.1.1")
    else:
        detector = LanguageDetectorBuilder.from_all_languages().build()
        t = time.perf_counter()
        theirs = [detector.detect_language_of(d) for _, d in docs]
        rows.append(("lingua (all languages, whole text)",
                     sum((x.iso_code_639_1.name.lower() if x else None) == lang
                         for (lang, _), x in zip(docs, theirs, strict=True)), time.perf_counter() - t))
    print("\n| library | labelled right | seconds |\n|---|---|---|")
    for name, right, seconds in rows:
        print(f"| {name} | {right / len(docs):.3f} | {seconds:.1f} |")
    print(f"\npy3langid at p >= {MIN_CONFIDENCE}: {len(accepted) / len(docs):.3f} of the documents accepted, "
          f"{sum(lang == c for lang, c in accepted) / max(1, len(accepted)):.4f} of those right; "
          f"{sum(lang == c for lang, c in accepted) / len(docs):.3f} of all labelled right")


if __name__ == "__main__":
    main()
