"""What a corpus build reports: sizes per language and source, tokenizer fertility, a PNG chart."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def fertility_table(counts: dict[str, dict]) -> str:
    """Tokens per character and per whitespace-separated word of each language's validation documents, from
    counts {lang: {docs, chars, words, tokens, bytes}} (tokens of the texts, without BOS/EOS)."""
    rows = [(lang, c["docs"], c["chars"], c["words"], c["tokens"], f"{c['tokens'] / max(c['chars'], 1):.3f}",
             f"{c['tokens'] / max(c['words'], 1):.2f}", f"{c['bytes'] / max(c['tokens'], 1):.2f}")
            for lang, c in sorted(counts.items())]
    return ("# Tokenizer fertility (validation split)\n\nWords are whitespace-separated, so Chinese and Japanese "
            "have few, long ones.\n\n" + markdown_table(("language", "documents", "characters", "words", "tokens",
                                                 "tokens/char", "tokens/word", "bytes/token"), rows) + "\n")


def plot_sizes(path: Path, rows: list[dict]) -> None:
    """report.png: text per language and source, and tokens per language."""
    # a bare Figure draws without pyplot's global state or a display backend
    langs = sorted({r["lang"] for r in rows})
    families = sorted({r["source"].rsplit("-", 1)[0] for r in rows})
    fig = Figure(figsize=(12, 4.5))
    ax1, ax2 = fig.subplots(1, 2)
    bottom = np.zeros(len(langs))
    for fam in families:
        mb = np.array([sum(r["bytes"] for r in rows if r["lang"] == lang and r["source"].rsplit("-", 1)[0] == fam)
                       for lang in langs]) / 1e6
        ax1.bar(langs, mb, bottom=bottom, label=fam)
        bottom += mb
    ax1.set(title="Text per language and source", ylabel="MB (UTF-8)")
    ax1.legend(fontsize=8)
    tokens = [sum(r["tokens"] for r in rows if r["lang"] == lang) / 1e6 for lang in langs]
    ax2.bar(langs, tokens, color="tab:gray")
    ax2.set(title="Tokens per language", ylabel="million tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def sum_by(rows: list[dict], key: str = "lang") -> dict[str, Counter]:
    totals: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        totals[r[key]].update(docs=r["docs"], bytes=r["bytes"], tokens=r["tokens"])
    return totals


def write_report(rows: list[dict], stats: dict[str, Counter], stages: dict[str, tuple[float, int]], vocab_size: int,
                 alpha: float, skipped: Sequence[tuple[str, int, str, str]] = ()) -> str:
    """report.md: sizes per language and source, duplicates, the time and throughput of each stage
    ({name: (seconds, bytes in)}) and the input records skipped ((file, count, first lines, reasons))."""
    langs = sum_by(rows)
    valid = sum_by([r for r in rows if r["split"] == "valid"])
    sources = sum_by(rows, "source")
    lang_rows = [(k, mb(v["bytes"]), v["docs"], f"{v['tokens']:,}", valid[k]["docs"], mb(valid[k]["bytes"]),
                  stats[f"lang:{k}"]["exact"], stats[f"lang:{k}"]["near"]) for k, v in sorted(langs.items())]
    total = sum((Counter(v) for v in langs.values()), Counter())
    lang_rows.append(("**all**", mb(total["bytes"]), total["docs"], f"{total['tokens']:,}",
                      sum(v["docs"] for v in valid.values()), mb(sum(v["bytes"] for v in valid.values())), "", ""))
    lang_of = {r["source"]: r["lang"] for r in rows}
    src_rows = [(s, lang_of[s], mb(v["bytes"]), v["docs"], f"{v['tokens']:,}", stats[s]["lines_dropped"],
                 stats[s]["lines_kept"], stats[s]["duplicates"]) for s, v in sorted(sources.items())]
    return "\n\n".join([
        "# Corpus report",
        f"Built in {sum(t for t, _ in stages.values()):.0f} s ("
        + ", ".join(f"{k} {t:.1f} s" + (f" at {n / 1e6 / max(t, 1e-9):.1f} MB/s" if n else "")
                    for k, (t, n) in stages.items())
        + f"). Tokenizer: {vocab_size} pieces, trained on a sample with language weights n_l ** {alpha}. MB are "
        "10^6 bytes of UTF-8; documents and tokens (with each document's BOS and EOS) cover train + validation.",
        "## Per language",
        markdown_table(("language", "MB", "documents", "tokens", "valid docs", "valid MB", "exact dups", "near dups"),
               lang_rows),
        "## Per source",
        "Lines dropped: removed by the language filter (code, symbols, other languages); duplicates: documents "
        "removed as exact or near duplicates.",
        markdown_table(("source", "language", "MB", "documents", "tokens", "lines dropped", "lines kept", "duplicates"),
               src_rows),
        "![text per language](report.png)",
        *(["## Skipped input records",
            "Records that could not be read; each one is listed with its file, line and reason in rejected.jsonl.",
            markdown_table(("file", "records", "first lines", "reasons"), skipped)] if skipped else []),
    ]) + "\n"
