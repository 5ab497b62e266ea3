"""What a corpus build reports: sizes per language and source, tokenizer fertility, a PNG chart."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


def count_tokens(tokenizer, docs: list[str], batch: int = 2048) -> int:
    return sum(len(ids) for i in range(0, len(docs), batch) for ids in tokenizer.encode_batch(docs[i:i + batch]))


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def fertility_table(tokenizer, valid: dict[str, list[str]]) -> str:
    """Tokens per character and per whitespace-separated word of each language's validation documents."""
    rows = []
    for lang in sorted(valid):
        docs = valid[lang]
        tokens = count_tokens(tokenizer, docs)
        chars = sum(len(d) for d in docs)
        words = sum(len(d.split()) for d in docs)
        nbytes = sum(len(d.encode()) for d in docs)
        rows.append((lang, len(docs), chars, words, tokens, f"{tokens / max(chars, 1):.3f}",
                     f"{tokens / max(words, 1):.2f}", f"{nbytes / max(tokens, 1):.2f}"))
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


def write_report(rows: list[dict], stats: dict[str, Counter], stages: dict[str, float], vocab_size: int,
            alpha: float) -> str:
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
        f"Built in {sum(stages.values()):.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in stages.items())}; "
        f"then the token shards). Tokenizer: {vocab_size} pieces, trained on a sample with language weights "
        f"n_l ** {alpha}. MB are 10^6 bytes of UTF-8; documents and tokens cover train + validation.",
        "## Per language",
        markdown_table(("language", "MB", "documents", "tokens", "valid docs", "valid MB", "exact dups", "near dups"),
               lang_rows),
        "## Per source",
        "Lines dropped: removed by the language filter (code, symbols, other languages); duplicates: documents "
        "removed as exact or near duplicates.",
        markdown_table(("source", "language", "MB", "documents", "tokens", "lines dropped", "lines kept", "duplicates"),
               src_rows),
        "![text per language](report.png)",
    ]) + "\n"
