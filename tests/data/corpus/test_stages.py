"""The streaming stages against the in-memory reference: the same documents kept, in the same order, capped and
split the same way, however small the parts; memory per unit bounded by the part size, not the corpus."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from palmkit.data.corpus import stages
from palmkit.data.corpus.build import RunOptions, SplitOptions, TokenizerOptions, build
from palmkit.data.corpus.clean import clean_text
from palmkit.data.corpus.dedup import deduplicate, doc_hash
from palmkit.data.corpus.stages import MIN_VALID_BYTES
from tests.data.corpus.conftest import perturbed_articles


def reference_split(docs: list[str], valid_fraction: float, max_mb: float) -> tuple[list[str], list[str]]:
    """Everything in memory: deduplicate, sort by order hash, cap, hold out by validation hash."""
    kept, _, _ = deduplicate(docs)
    ranked = sorted(kept, key=lambda i: (doc_hash(docs[i], "order"), i))
    capped, total = [], 0
    for i in ranked:
        if max_mb and total >= max_mb * 1e6:
            break
        capped.append(docs[i])
        total += len(docs[i].encode())
    cut = max(valid_fraction, min(0.1, MIN_VALID_BYTES / max(total, 1)))
    keys = [doc_hash(d, "valid") for d in capped]
    held = [k < cut for k in keys]
    if len(capped) >= 2 and not any(held):
        held[int(np.argmin(keys))] = True
    return [d for d, h in zip(capped, held, strict=True) if not h], [d for d, h in zip(capped, held, strict=True) if h]


def texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("max_mb", [0.0, 0.008])
def test_streaming_split_matches_the_in_memory_reference(tmp_path, monkeypatch, max_mb):
    from palmkit.data.corpus import build as build_module

    monkeypatch.setattr(build_module, "DEDUP_PART_BYTES", 10_000)  # dedup keys over several partitions
    units = []
    pairs_unit = stages.pairs_unit

    def counted(work, plan, lang, part):
        units.append((lang, part, plan.dedup_parts))
        pairs_unit(work, plan, lang, part)

    monkeypatch.setattr(stages, "pairs_unit", counted)
    docs = [clean_text(d) for d in perturbed_articles(seed=2)]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    # parts of ~4 kB: documents are spread over many parts and read tasks, and the cap falls inside a part
    build(str(tmp_path / "out"), langs="en", subset="none", inputs=[str(data)], lang="en",
          split=SplitOptions(max_mb_per_lang=max_mb), tokenizer=TokenizerOptions(vocab_size=400),
          run=RunOptions(workers=1, unit_mb=0.004))
    train, valid = reference_split(docs, 0.02, max_mb)
    assert texts(tmp_path / "out/text/en/train.jsonl") == train
    assert texts(tmp_path / "out/text/en/valid.jsonl") == valid
    assert len(train) < len(docs) - 10  # the near and exact copies are gone
    parts = units[0][2]
    assert parts > 3 and sorted(units) == [("en", k, parts) for k in range(parts)]
    if max_mb:
        size = sum(len(d.encode()) for d in train + valid)
        assert max_mb * 1e6 <= size < max_mb * 1e6 + max(len(d.encode()) for d in docs)
    assert not (tmp_path / "out/.build").exists()  # the work folder is removed when the build is done
