"""The stages of a streaming corpus build and their units of work, each writing only its own files.

    extract   one unit per piece of input: read, clean, filter; documents, MinHash signatures and keys to disk
    dedup     one unit per language: exact and near duplicates in document order (`DuplicateIndex`: blocks of
              documents against sorted runs on disk), then the plan of the language's split (cap, validation
              cut, parts)
    split     one unit per part of a language (the documents whose order hash falls in the part's range):
              sorted by that hash, capped, split into train/valid text, a tokenizer sample drawn
    encode    one unit per part: the text encoded into token files

Every unit is a pure function of the build plan and the files of the stages before it, so its output is the same
whichever worker runs it, and a finished unit never has to run again. The order hash sorts each language's
documents (a seedless shuffle: sources mix in the files, and a cap keeps a fair sample); cutting its range into
parts sorts a corpus of any size with one part in memory at a time.
"""

from __future__ import annotations

import bisect
import json
import math
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from palmkit.data.corpus.dedup import BINS, EXACT, KEPT, NEAR, DuplicateIndex, normalise
from palmkit.data.corpus.extract import Task, clean_documents, extract
from palmkit.data.corpus.inputs import Piece, read_piece
from palmkit.data.corpus.spill import DocReader, DocWriter
from palmkit.data.shards import mixture_weights, shard_dtype, write_tokens
from palmkit.io import atomic_write_json, staged_dir
from palmkit.model.tokenizer import Tokenizer

MIN_VALID_BYTES = 100_000  # small languages still get enough held-out text for a stable perplexity


TOKENIZER_SAMPLE_BYTES = 24_000_000  # enough for a 32k vocabulary; training time grows with the sample


DEDUP_BLOCK_DOCS = 32_768  # documents deduplicated in memory at a time; each block reads the runs once


HASH_BATCH_CHARS = 1_000_000  # documents hashed together: minhash_many needs ~70 bytes per character


SPLITS = ("train", "valid")


@dataclass(frozen=True)
class ReadTask:
    """One extraction unit: a chunk of a built-in source's files, or pieces of the user's input files."""

    source: str
    lang: str
    nbytes: int
    task: Task | None = None
    pieces: tuple[Piece, ...] = ()
    text_field: str = "text"

    @staticmethod
    def from_json(d: dict) -> ReadTask:
        task = Task(**{**d["task"], "files": tuple(d["task"]["files"])}) if d["task"] else None
        return ReadTask(d["source"], d["lang"], d["nbytes"], task, tuple(Piece(**p) for p in d["pieces"]),
                        d["text_field"])


@dataclass(frozen=True)
class Plan:
    """What a build does: its read tasks and the parameters of the later stages (saved as plan.json)."""

    tasks: tuple[ReadTask, ...]
    valid_fraction: float = 0.02
    max_mb_per_lang: float = 0.0
    part_mb: float = 32.0
    alpha: float = 0.3
    seed: int = 0

    @property
    def langs(self) -> list[str]:
        return sorted({t.lang for t in self.tasks})

    def tasks_of(self, lang: str) -> list[int]:
        return [i for i, t in enumerate(self.tasks) if t.lang == lang]

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def load(work: Path) -> Plan:
        d = json.loads((work / "plan.json").read_text(encoding="utf-8"))
        return Plan(tuple(ReadTask.from_json(t) for t in d.pop("tasks")), **d)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------------
# extract


def extract_unit(work: Path, plan: Plan, t: int) -> None:
    """Documents of read task t, cleaned, into work/extract/<t>/ (texts, signatures, keys, stats, rejects)."""
    task = plan.tasks[t]
    with staged_dir(work / "extract" / f"{t:05d}") as folder:
        stats: Counter = Counter()
        with open(folder / "rejected.jsonl", "w", encoding="utf-8") as rejects:
            def reject(path: str, line: int, reason: str) -> None:
                stats["invalid"] += 1
                rejects.write(json.dumps({"file": path, "line": line, "reason": reason}, ensure_ascii=False) + "\n")

            if task.task is not None:
                docs, found = extract(task.task)  # a chunk of a built-in source: a few hundred files at most
                stats.update(found)
            else:
                docs = clean_documents((text for piece in task.pieces
                                        for text in read_piece(piece, task.text_field, reject)),
                                       task.lang, False, stats)
            writer = DocWriter(folder)
            for batch in _batches(docs):
                writer.add(batch)
            stats["bytes"] = writer.offset
            stats["docs"] = writer.close()
        atomic_write_json(folder / "stats.json", dict(stats))


def _batches(docs, chars: int = HASH_BATCH_CHARS) -> Iterator[list[str]]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# --------------------------------------------------------------------------------------------------
# dedup


class _Readers:
    """The spilled documents of one language's tasks, numbered in task order, opened on demand."""

    keep_open = 64  # files stay open for the next candidate's signature, up to this many tasks

    def __init__(self, work: Path, tasks: list[int]):
        self.work, self.tasks = work, tasks
        self.open: dict[int, DocReader] = {}
        counts = [len(np.load(self._folder(t) / "meta.npy", mmap_mode="r")) for t in tasks]
        self.first = [0, *np.cumsum(counts, dtype=np.int64).tolist()]  # each task's first document

    def _folder(self, t: int) -> Path:
        return self.work / "extract" / f"{t:05d}"

    def reader(self, t: int) -> DocReader:
        if t not in self.open:
            if len(self.open) >= self.keep_open:  # the least recently used one
                self.open.pop(next(iter(self.open))).close()
            self.open[t] = DocReader(self._folder(t))
        self.open[t] = self.open.pop(t)
        return self.open[t]

    def _where(self, doc: int) -> tuple[DocReader, int]:
        k = bisect.bisect_right(self.first, doc) - 1
        return self.reader(self.tasks[k]), doc - self.first[k]

    def sigs(self, docs: np.ndarray) -> np.ndarray:
        """Signatures of documents by their numbers in the language, (len(docs), BINS)."""
        raw = b"".join(reader.sig_bytes(i) for reader, i in map(self._where, docs.tolist()))
        return np.frombuffer(raw, dtype=np.uint64).reshape(-1, BINS)

    def norm(self, doc: int) -> str:
        """The normalised text of a document by its number in the language."""
        reader, i = self._where(doc)
        return normalise(reader.text(i))

    def blocks(self, size: int) -> Iterator[list[tuple[int, int, int]]]:
        """The documents in blocks of `size` (the last one shorter): (task, start, stop) pieces of tasks."""
        starts = self.first
        for first in range(0, starts[-1], size):
            last = min(starts[-1], first + size)
            k = bisect.bisect_right(starts, first) - 1
            block = []
            while k < len(self.tasks) and starts[k] < last:
                block.append((self.tasks[k], max(first, starts[k]) - starts[k], min(last, starts[k + 1]) - starts[k]))
                k += 1
            yield [(t, a, b) for t, a, b in block if b > a]

    def close(self) -> None:
        for r in self.open.values():
            r.close()
        self.open.clear()


def dedup_unit(work: Path, plan: Plan, i: int) -> None:
    """Exact and near duplicates of language i, in document order; then its split plan (work/dedup/<lang>/)."""
    lang = plan.langs[i]
    tasks = plan.tasks_of(lang)
    readers = _Readers(work, tasks)
    runs = work / "dedup" / f"{lang}.runs"
    shutil.rmtree(runs, ignore_errors=True)  # the scratch runs of an interrupted dedup: it starts again
    index = DuplicateIndex(runs, readers.sigs, readers.norm)
    counts: Counter = Counter()
    status: dict[int, np.ndarray] = {}
    try:
        with staged_dir(work / "dedup" / lang) as folder:
            for block in readers.blocks(DEDUP_BLOCK_DOCS):
                exact = np.concatenate([readers.reader(t).meta["exact"][a:b] for t, a, b in block])
                sigs = np.concatenate([readers.reader(t).sigs(a, b) for t, a, b in block])
                decided = np.split(index.add(exact, sigs), np.cumsum([b - a for _, a, b in block])[:-1])
                for (t, a, b), part in zip(block, decided, strict=True):
                    status.setdefault(t, np.zeros(len(readers.reader(t)), dtype=np.uint8))[a:b] = part
                    if b == len(readers.reader(t)):  # the task's last documents: its statuses are final
                        done = status.pop(t)
                        np.save(folder / f"{t:05d}.npy", done)
                        counts[f"dup:{plan.tasks[t].source}"] += int((done != KEPT).sum())
                        counts["exact"] += int((done == EXACT).sum())
                        counts["near"] += int((done == NEAR).sum())
            for t in tasks:  # tasks without documents
                if not (folder / f"{t:05d}.npy").exists():
                    np.save(folder / f"{t:05d}.npy", np.zeros(0, dtype=np.uint8))
            atomic_write_json(folder / "plan.json", {**split_plan(work, plan, lang, tasks, folder), **counts})
    finally:
        readers.close()
        shutil.rmtree(runs, ignore_errors=True)


def _kept(work: Path, tasks: list[int], status_dir: Path,
          ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """(task, metadata of its kept documents, their numbers in the language, their indices in the task)."""
    start = 0
    for t in tasks:
        meta = np.load(work / "extract" / f"{t:05d}" / "meta.npy", allow_pickle=False)
        index = np.flatnonzero(np.load(status_dir / f"{t:05d}.npy", allow_pickle=False) == KEPT)
        yield t, meta[index], start + index, index
        start += len(meta)


def part_of(order: np.ndarray, parts: int) -> np.ndarray:
    """The part of each order hash: `parts` equal ranges of [0, 1), in order."""
    return np.minimum((order * parts).astype(np.int64), parts - 1)


def _included(order: np.ndarray, doc: np.ndarray, part: np.ndarray, limit: dict | None) -> np.ndarray:
    """Documents inside the cap: the first documents in order hash until the cap is reached."""
    if limit is None:
        return np.ones(len(order), dtype=bool)
    at = part == limit["part"]
    return (part < limit["part"]) | (at & ((order < limit["order"]) | ((order == limit["order"]) &
                                                                          (doc <= limit["doc"]))))


def split_plan(work: Path, plan: Plan, lang: str, tasks: list[int], status_dir: Path) -> dict:
    """How language `lang` is capped, split and cut into parts, from the kept documents' metadata only.

    The same rules as sorting all documents by order hash: the cap keeps documents while the text before them is
    under max_mb_per_lang; a document is held out when its validation hash is under the cut (at least ~100 kB
    where the language has it, at most 10%), and a language of two or more documents holds out at least one.
    """
    total = sum(int(m["size"].sum()) for _, m, _, _ in _kept(work, tasks, status_dir))
    parts = max(1, math.ceil(total / (plan.part_mb * 1e6)))
    part_bytes = np.zeros(parts, dtype=np.int64)
    for _, m, _, _ in _kept(work, tasks, status_dir):
        part_bytes += np.bincount(part_of(m["order"], parts), weights=m["size"], minlength=parts).astype(np.int64)
    cap, limit = plan.max_mb_per_lang * 1e6, None
    if cap > 0 and part_bytes.sum() >= cap:
        cum = np.cumsum(part_bytes)
        c = int(np.searchsorted(cum, cap))  # the first part whose end reaches the cap
        rows = [(m["order"][sel], doc[sel], m["size"][sel])
                for _, m, doc, _ in _kept(work, tasks, status_dir)
                for sel in [part_of(m["order"], parts) == c]]
        order, doc, size = (np.concatenate(x) for x in zip(*rows, strict=True))
        ranked = np.lexsort((doc, order))
        before = np.concatenate([[0], np.cumsum(size[ranked])[:-1]]) + int(cum[c] - part_bytes[c])
        last = ranked[int(np.flatnonzero(before < cap)[-1])]
        limit = {"part": c, "order": float(order[last]), "doc": int(doc[last])}
    docs = nbytes = 0
    best = (2.0, 0.0, 0)  # the smallest (validation hash, order hash, number): held out if nothing else is
    for _, m, doc, _ in _kept(work, tasks, status_dir):
        inside = _included(m["order"], doc, part_of(m["order"], parts), limit)
        docs += int(inside.sum())
        nbytes += int(m["size"][inside].sum())
        if inside.any():
            j = np.lexsort((doc[inside], m["order"][inside], m["valid"][inside]))[0]
            best = min(best, (float(m["valid"][inside][j]), float(m["order"][inside][j]), int(doc[inside][j])))
    cut = max(plan.valid_fraction, min(0.1, MIN_VALID_BYTES / max(nbytes, 1)))
    held_docs = held_bytes = 0
    part_bytes[:] = 0
    for _, m, doc, _ in _kept(work, tasks, status_dir):
        part = part_of(m["order"], parts)
        inside = _included(m["order"], doc, part, limit)
        held = inside & (m["valid"] < cut)
        held_docs += int(held.sum())
        held_bytes += int(m["size"][held].sum())
        part_bytes += np.bincount(part[inside], weights=m["size"][inside], minlength=parts).astype(np.int64)
    forced = None
    if docs >= 2 and not held_docs:  # a tiny language still gets one validation document
        forced = best[2]
        held_docs += 1
        held_bytes += sum(int(m["size"][doc == forced].sum()) for _, m, doc, _ in _kept(work, tasks, status_dir))
    train_docs = docs - held_docs
    return {"lang": lang, "parts": parts if train_docs else 0, "part_bytes": part_bytes.tolist(), "limit": limit,
            "cut": cut, "forced": forced, "docs": docs, "bytes": nbytes, "train_docs": train_docs,
            "train_bytes": nbytes - held_bytes}


def lang_plans(work: Path, plan: Plan) -> dict[str, dict]:
    return {lang: read_json(work / "dedup" / lang / "plan.json") for lang in plan.langs}


def part_units(work: Path, plan: Plan) -> list[tuple[str, int]]:
    """(language, part) of the split and encode stages, languages without training documents left out."""
    return [(lang, k) for lang, p in lang_plans(work, plan).items() for k in range(p["parts"])]


# --------------------------------------------------------------------------------------------------
# split


def training_lines(doc: str, width: int = 4000) -> Iterator[str]:
    """Lines of a document for tokenizer training, long ones cut at spaces (SentencePiece skips long lines)."""
    for line in doc.split("\n"):
        while len(line) > width:
            cut = line.rfind(" ", width // 2, width)
            cut = cut if cut > 0 else width
            yield line[:cut]
            line = line[cut:]
        if line.strip():
            yield line


def sample_rates(plans: dict[str, dict], alpha: float, budget: int = TOKENIZER_SAMPLE_BYTES) -> dict[str, float]:
    """Copies of each training line in the tokenizer sample, per language: the sample draws language l in
    proportion to n_l ** alpha (n_l = training bytes), so small languages are repeated rather than drowned."""
    sizes = {lang: p["train_bytes"] for lang, p in plans.items() if p["parts"]}
    weights = mixture_weights(sizes, alpha)
    budget = min(budget, sum(sizes.values()))
    return {lang: budget * weights[lang] / max(n, 1) for lang, n in sizes.items()}


def split_unit(work: Path, plan: Plan, lang: str, k: int) -> None:
    """Part k of a language: its documents in order-hash order, capped and split, with a tokenizer sample."""
    plans = lang_plans(work, plan)
    lp, rate = plans[lang], sample_rates(plans, plan.alpha)[lang]
    tasks = plan.tasks_of(lang)
    picked = []  # (order, number, task, index in task)
    for t, m, doc, index in _kept(work, tasks, work / "dedup" / lang):
        part = part_of(m["order"], lp["parts"])
        sel = (part == k) & _included(m["order"], doc, part, lp["limit"])
        picked += zip(m["order"][sel].tolist(), doc[sel].tolist(), [t] * int(sel.sum()), index[sel].tolist(),
                      m["valid"][sel].tolist(), strict=True)
    texts: dict[tuple[int, int], str] = {}
    for t in sorted({p[2] for p in picked}):
        r = DocReader(work / "extract" / f"{t:05d}")
        for i in sorted(p[3] for p in picked if p[2] == t):  # in file order
            texts[t, i] = r.text(i)
        r.close()
    picked.sort(key=lambda p: (p[0], p[1]))
    rng = np.random.default_rng([plan.seed, k, *lang.encode()])
    stats: Counter = Counter()
    with staged_dir(work / "split" / lang / f"{k:04d}") as folder:
        files = {s: open(folder / f"{s}.jsonl", "w", encoding="utf-8") for s in SPLITS}
        with files["train"], files["valid"], open(folder / "sample.txt", "w", encoding="utf-8") as sample:
            for _order, doc, t, i, valid in picked:
                text, source = texts.pop((t, i)), plan.tasks[t].source
                split = "valid" if valid < lp["cut"] or doc == lp["forced"] else "train"
                files[split].write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
                stats[f"{split}\t{source}\tdocs"] += 1
                stats[f"{split}\t{source}\tbytes"] += len(text.encode("utf-8"))
                if split == "train":
                    for line in training_lines(text):
                        for _ in range(int(rate) + int(rng.random() < rate % 1)):
                            sample.write(line + "\n")
        atomic_write_json(folder / "stats.json", dict(stats))


def read_jsonl_texts(path: Path) -> Iterator[tuple[str, str]]:
    """(text, source) of a text part."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            yield row["text"], row["source"]


# --------------------------------------------------------------------------------------------------
# encode


def encode_unit(work: Path, plan: Plan, lang: str, k: int, batch_docs: int = 2048) -> None:
    """Token files of part k of a language, with token counts per source and the validation split's fertility."""
    tokenizer = Tokenizer(work / "tokenizer.model")
    dtype = shard_dtype(tokenizer)
    src = work / "split" / lang / f"{k:04d}"
    stats: Counter = Counter()
    with staged_dir(work / "encode" / lang / f"{k:04d}") as folder:
        for split in SPLITS:
            with open(folder / f"{split}.bin", "wb") as f:
                for batch in _chunks(read_jsonl_texts(src / f"{split}.jsonl"), batch_docs):
                    counts = write_tokens(f, tokenizer, [t for t, _ in batch], dtype)
                    for (text, source), n in zip(batch, counts, strict=True):
                        stats[f"{split}\t{source}\ttokens"] += n
                        if split == "valid":
                            stats["valid_chars"] += len(text)
                            stats["valid_words"] += len(text.split())
        atomic_write_json(folder / "stats.json", dict(stats))


def _chunks(items: Iterator, n: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


def stats_rows(stats: dict, lang: str) -> list[dict]:
    """Report rows {lang, source, split, docs, bytes, tokens} of a stats dict keyed "split\\tsource\\tfield"."""
    rows: dict[tuple[str, str], dict] = defaultdict(lambda: {"docs": 0, "bytes": 0, "tokens": 0})
    for key, n in stats.items():
        if key.count("\t") == 2:
            split, source, field = key.split("\t")
            rows[split, source][field] += n
    return [{"lang": lang, "source": s, "split": split, **v} for (split, s), v in sorted(rows.items())]


# --------------------------------------------------------------------------------------------------
# dispatch (datatrove calls `run_unit` with the unit's number)


def run_unit(work: Path, stage: str, i: int) -> None:
    plan = Plan.load(work)
    if stage == "extract":
        extract_unit(work, plan, i)
    elif stage == "dedup":
        dedup_unit(work, plan, i)
    else:
        lang, k = part_units(work, plan)[i]
        (split_unit if stage == "split" else encode_unit)(work, plan, lang, k)
