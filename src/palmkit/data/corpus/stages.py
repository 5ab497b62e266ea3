"""The stages of a streaming corpus build and their units of work, each writing only its own files.

    extract   one unit per piece of input: read, clean, filter, tell each document's language (`--lang auto`);
              documents, MinHash signatures, exact keys and LSH band keys (sorted by dedup partition) to disk,
              a folder per language
    pairs     one unit per dedup partition of a language: the exact duplicates and the candidate near-duplicate
              pairs among the keys that hash to the partition (`dedup.exact_duplicates`, `dedup.candidate_pairs`)
    verify    one unit per range of a language's documents: the exact checks of the pairs whose later document
              is in the range (`dedup.verify`)
    dedup     one unit per language: the pairs settled in document order (`dedup.settle`), then the plan of the
              language's split (cap, validation cut, parts)
    split     one unit per part of a language (the documents whose order hash falls in the part's range):
              sorted by that hash, capped, split into train/valid text, a tokenizer sample drawn
    encode    one unit per part: the text encoded into token files

Every unit is a pure function of the build plan and the files of the stages before it, so its output is the same
whichever worker runs it, and a finished unit never has to run again. The order hash sorts each language's
documents (a seedless shuffle: sources mix in the files, and a cap keeps a fair sample); cutting its range into
parts sorts a corpus of any size with one part in memory at a time. Deduplication is a distributed sort: each
band key goes to one partition (by its hash), each partition sorts its keys, and only the pairs it finds, a few
per document, meet in one place.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from palmkit.data.corpus.dedup import (
    BINS,
    EXACT,
    KEPT,
    NEAR,
    PAIR,
    candidate_pairs,
    exact_duplicates,
    exact_halves,
    normalise,
    partition_of,
    settle,
    verify,
)
from palmkit.data.corpus.extract import Task, clean_document, extract
from palmkit.data.corpus.inputs import Piece, read_records
from palmkit.data.corpus.langid import MIN_CONFIDENCE, identify
from palmkit.data.corpus.spill import DocReader, DocWriter, band_entries
from palmkit.data.shards import SPLITS, mixture_weights, shard_dtype, write_tokens
from palmkit.io import atomic_write_json, jsonl_rows, staged_dir
from palmkit.model.tokenizer import Tokenizer

MIN_VALID_BYTES = 100_000  # small languages still get enough held-out text for a stable perplexity


TOKENIZER_SAMPLE_BYTES = 24_000_000  # enough for a 32k vocabulary; training time grows with the sample


HASH_BATCH_CHARS = 1_000_000  # documents hashed together: minhash_many needs ~70 bytes per character


DEDUP_PART_BYTES = 64_000_000  # input per dedup partition: its band keys sort in memory (~20 MB per 64 MB)


AUTO = "auto"  # the language of a read task whose documents are told apart one by one


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
    """What a build does: its read tasks and the parameters of the later stages (saved as plan.json).

    `allowed`: the languages the user's documents may have under `--lang auto` (empty: any); `normalize`: the
    user's text is cleaned like the built-in sources' instead of kept as given; `dedup_parts`: the partitions of
    each language's dedup keys."""

    tasks: tuple[ReadTask, ...]
    valid_fraction: float = 0.02
    max_mb_per_lang: float = 0.0
    part_mb: float = 32.0
    alpha: float = 0.3
    seed: int = 0
    allowed: tuple[str, ...] = ()
    normalize: bool = False
    dedup_parts: int = 1

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def load(work: Path) -> Plan:
        d = json.loads((work / "plan.json").read_text(encoding="utf-8"))
        return Plan(tuple(ReadTask.from_json(t) for t in d.pop("tasks")), **{**d, "allowed": tuple(d["allowed"])})


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def extracted(work: Path, plan: Plan) -> dict[str, dict[int, tuple[int, int]]]:
    """{language: {task: (documents, bytes)}} of the extracted documents, tasks in order (after extract)."""
    found: dict[str, dict[int, tuple[int, int]]] = defaultdict(dict)
    for t in range(len(plan.tasks)):
        stats = read_json(work / "extract" / f"{t:05d}" / "stats.json")
        for key, n in stats.items():
            if key.startswith("docs:") and n:
                found[key[5:]][t] = (n, stats[f"bytes:{key[5:]}"])
    return dict(sorted(found.items()))


def languages(work: Path, plan: Plan) -> list[str]:
    """The languages of the extracted documents, sorted."""
    return list(extracted(work, plan))


def segment(work: Path, t: int, lang: str) -> Path:
    """The folder of task t's documents in language `lang`."""
    return work / "extract" / f"{t:05d}" / lang


# --------------------------------------------------------------------------------------------------
# extract


class _Extraction:
    """The files one extraction unit writes: documents per language, batched for hashing, and its rejects."""

    def __init__(self, folder: Path, dedup_parts: int, rejects):
        self.folder, self.dedup_parts, self.rejects = folder, dedup_parts, rejects
        self.stats: Counter = Counter()
        self.writers: dict[str, DocWriter] = {}
        self.batches: dict[str, list[str]] = defaultdict(list)
        self.sizes: Counter = Counter()

    def add(self, lang: str, doc: str) -> None:
        self.batches[lang].append(doc)
        self.sizes[lang] += len(doc)
        if self.sizes[lang] >= HASH_BATCH_CHARS:
            self.flush(lang)

    def flush(self, lang: str) -> None:
        if lang not in self.writers:
            self.writers[lang] = DocWriter(self.folder / lang, self.dedup_parts)
        self.writers[lang].add(self.batches.pop(lang, []))
        self.sizes[lang] = 0

    def reject(self, path: str, line: int, reason: str, key: str = "invalid") -> None:
        self.stats[key] += 1
        self.rejects.write(json.dumps({"file": path, "line": line, "reason": reason}, ensure_ascii=False) + "\n")

    def close(self) -> dict:
        """Flush every language; the unit's stats."""
        stats = self.stats
        for lang in sorted(set(self.batches) | set(self.writers)):
            self.flush(lang)
            stats[f"bytes:{lang}"] = self.writers[lang].offset
            stats[f"docs:{lang}"] = self.writers[lang].close()
        stats["bytes"] = sum(w.offset for w in self.writers.values())
        stats["docs"] = sum(stats[f"docs:{lang}"] for lang in self.writers)
        return dict(stats)


def _user_documents(task: ReadTask, plan: Plan, out: _Extraction) -> Iterator[tuple[str, str]]:
    """(language, document) of the user's input pieces, cleaned; a document whose language is unclear or not
    asked for is rejected."""
    for piece in task.pieces:
        for line, text in read_records(piece, task.text_field, out.reject):
            doc = clean_document(text, task.lang, False, out.stats, as_given=not plan.normalize)
            if doc is None:
                continue
            lang = task.lang
            if lang == AUTO:
                lang, p = identify(doc)
                if p < MIN_CONFIDENCE:
                    out.reject(piece.path, line, f"language unclear (at most {lang}, p = {p:.2f} < "
                                                 f"{MIN_CONFIDENCE})", "language_unclear")
                    continue
                if plan.allowed and lang not in plan.allowed:
                    out.reject(piece.path, line, f"language {lang} not in --langs", "language_other")
                    continue
            yield lang, doc


def extract_unit(work: Path, plan: Plan, t: int) -> None:
    """Documents of read task t, cleaned, into work/extract/<t>/<lang>/ (texts, signatures, keys), with its stats
    and the records it could not use (rejected.jsonl: file, line, reason)."""
    task = plan.tasks[t]
    with staged_dir(work / "extract" / f"{t:05d}") as folder:
        with open(folder / "rejected.jsonl", "w", encoding="utf-8") as rejects:
            out = _Extraction(folder, plan.dedup_parts, rejects)
            if task.task is not None:
                docs, found = extract(task.task)  # a chunk of a built-in source: a few hundred files at most
                out.stats.update(found)
                for doc in docs:
                    out.add(task.lang, doc)
            else:
                for lang, doc in _user_documents(task, plan, out):
                    out.add(lang, doc)
        atomic_write_json(folder / "stats.json", out.close())


# --------------------------------------------------------------------------------------------------
# dedup


class _Segments:
    """The extracted documents of one language, numbered in task order, read by number (memory-mapped)."""

    def __init__(self, work: Path, lang: str, tasks: dict[int, tuple[int, int]]):
        self.work, self.lang, self.tasks = work, lang, list(tasks)
        self.first = np.array([0, *np.cumsum([n for n, _ in tasks.values()])], dtype=np.int64)
        self._sigs = [np.memmap(segment(work, t, lang) / "sigs.bin", dtype=np.uint64, mode="r").reshape(-1, BINS)
                      for t in self.tasks]
        self._meta = [np.load(segment(work, t, lang) / "meta.npy", mmap_mode="r") for t in self.tasks]
        self._readers: dict[int, DocReader] = {}

    def __len__(self) -> int:
        return int(self.first[-1])

    def _gather(self, docs: np.ndarray, arrays: list[np.ndarray]) -> np.ndarray:
        docs = np.asarray(docs, dtype=np.int64)
        k = np.searchsorted(self.first, docs, side="right") - 1
        out = np.empty((len(docs), *arrays[0].shape[1:]), dtype=arrays[0].dtype)
        for s in np.unique(k).tolist():
            at = k == s
            out[at] = arrays[s][docs[at] - self.first[s]]
        return out

    def sigs(self, docs: np.ndarray) -> np.ndarray:
        """Signatures of documents by number, (len(docs), BINS)."""
        return self._gather(docs, self._sigs)

    def exact(self) -> np.ndarray:
        """The exact keys (S16) of all documents, in order."""
        return np.concatenate([m["exact"] for m in self._meta]) if self._meta else np.zeros(0, dtype="S16")

    def bands(self, part: int) -> tuple[np.ndarray, np.ndarray]:
        """(keys, document numbers) of the band entries of dedup partition `part`."""
        entries = [(band_entries(segment(self.work, t, self.lang), part), self.first[s])
                   for s, t in enumerate(self.tasks)]
        keys = [e["key"] for e, _ in entries]
        docs = [e["doc"] + first for e, first in entries]
        return (np.concatenate(keys), np.concatenate(docs)) if entries else (np.zeros(0, np.int64),) * 2

    def norm(self, doc: int) -> str:
        """The normalised text of a document by number."""
        s = int(np.searchsorted(self.first, doc, side="right")) - 1
        t = self.tasks[s]
        if t not in self._readers:
            if len(self._readers) >= 64:  # the least recently opened one
                self._readers.pop(next(iter(self._readers))).close()
            self._readers[t] = DocReader(segment(self.work, t, self.lang))
        return normalise(self._readers[t].text(doc - int(self.first[s])))

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()


def pair_units(work: Path, plan: Plan) -> list[tuple[str, int]]:
    """(language, dedup partition) of the pairs stage, (language, range of documents) of the verify stage."""
    return [(lang, p) for lang in languages(work, plan) for p in range(plan.dedup_parts)]


def pairs_unit(work: Path, plan: Plan, lang: str, part: int) -> None:
    """Exact duplicates and candidate near-duplicate pairs among the keys of one dedup partition of a language
    (work/pairs/<lang>/<part>/)."""
    segs = _Segments(work, lang, extracted(work, plan)[lang])
    with staged_dir(work / "pairs" / lang / f"{part:04d}") as folder:
        exact = segs.exact()
        mine = np.flatnonzero(partition_of(np.ascontiguousarray(exact_halves(exact)[:, 0]), plan.dedup_parts)
                              == part)
        np.save(folder / "exact.npy", exact_duplicates(exact[mine], mine))
        keys, docs = segs.bands(part)
        pairs = candidate_pairs(keys, docs, exact[docs], segs.sigs)
        pairs = pairs[np.argsort(pairs["later"], kind="stable")]
        np.save(folder / "pairs.npy", pairs)
        np.save(folder / "starts.npy", np.searchsorted(_range_of(pairs["later"], len(segs), plan.dedup_parts),
                                                       np.arange(plan.dedup_parts + 1)))


def _range_of(docs: np.ndarray, n: int, ranges: int) -> np.ndarray:
    """The verify range of each document number: `ranges` equal ranges of [0, n)."""
    return docs * ranges // max(n, 1)


def verify_unit(work: Path, plan: Plan, lang: str, q: int) -> None:
    """The exact checks of the candidate pairs whose later document is in range q (work/verify/<lang>/<q>/)."""
    segs = _Segments(work, lang, extracted(work, plan)[lang])
    pairs = []
    for part in range(plan.dedup_parts):
        folder = work / "pairs" / lang / f"{part:04d}"
        starts = np.load(folder / "starts.npy")
        pairs.append(np.load(folder / "pairs.npy", mmap_mode="r")[starts[q]:starts[q + 1]])
    try:
        with staged_dir(work / "verify" / lang / f"{q:04d}") as folder:
            np.save(folder / "pairs.npy", verify(np.concatenate(pairs), segs.norm))
    finally:
        segs.close()


def dedup_unit(work: Path, plan: Plan, i: int) -> None:
    """Exact and near duplicates of language i in document order, from its partitions' results; then its split
    plan (work/dedup/<lang>/: a status per document of each task, plan.json)."""
    lang = languages(work, plan)[i]
    tasks = extracted(work, plan)[lang]
    segs = _Segments(work, lang, tasks)
    parts = range(plan.dedup_parts)
    try:
        exact = np.concatenate([np.load(work / "pairs" / lang / f"{p:04d}" / "exact.npy") for p in parts])
        pairs = np.concatenate([np.load(work / "verify" / lang / f"{q:04d}" / "pairs.npy") for q in parts]) \
            if parts else np.zeros(0, dtype=PAIR)
        status = settle(len(segs), exact, pairs, segs.norm)
    finally:
        segs.close()
    counts: Counter = Counter()
    with staged_dir(work / "dedup" / lang) as folder:
        for s, t in enumerate(segs.tasks):
            done = status[segs.first[s]:segs.first[s + 1]]
            np.save(folder / f"{t:05d}.npy", done)
            counts[f"dup:{plan.tasks[t].source}"] += int((done != KEPT).sum())
        counts["exact"], counts["near"] = int((status == EXACT).sum()), int((status == NEAR).sum())
        atomic_write_json(folder / "plan.json", {**split_plan(work, plan, lang, segs.tasks, folder), **counts})


def _kept(work: Path, lang: str, tasks: list[int], status_dir: Path,
          ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """(task, metadata of its kept documents, their numbers in the language, their indices in the task)."""
    start = 0
    for t in tasks:
        meta = np.load(segment(work, t, lang) / "meta.npy", allow_pickle=False)
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
    total = sum(int(m["size"].sum()) for _, m, _, _ in _kept(work, lang, tasks, status_dir))
    parts = max(1, math.ceil(total / (plan.part_mb * 1e6)))
    part_bytes = np.zeros(parts, dtype=np.int64)
    for _, m, _, _ in _kept(work, lang, tasks, status_dir):
        part_bytes += np.bincount(part_of(m["order"], parts), weights=m["size"], minlength=parts).astype(np.int64)
    cap, limit = plan.max_mb_per_lang * 1e6, None
    if cap > 0 and part_bytes.sum() >= cap:
        cum = np.cumsum(part_bytes)
        c = int(np.searchsorted(cum, cap))  # the first part whose end reaches the cap
        rows = [(m["order"][sel], doc[sel], m["size"][sel])
                for _, m, doc, _ in _kept(work, lang, tasks, status_dir)
                for sel in [part_of(m["order"], parts) == c]]
        order, doc, size = (np.concatenate(x) for x in zip(*rows, strict=True))
        ranked = np.lexsort((doc, order))
        before = np.concatenate([[0], np.cumsum(size[ranked])[:-1]]) + int(cum[c] - part_bytes[c])
        last = ranked[int(np.flatnonzero(before < cap)[-1])]
        limit = {"part": c, "order": float(order[last]), "doc": int(doc[last])}
    docs = nbytes = 0
    best = (2.0, 0.0, 0)  # the smallest (validation hash, order hash, number): held out if nothing else is
    for _, m, doc, _ in _kept(work, lang, tasks, status_dir):
        inside = _included(m["order"], doc, part_of(m["order"], parts), limit)
        docs += int(inside.sum())
        nbytes += int(m["size"][inside].sum())
        if inside.any():
            j = np.lexsort((doc[inside], m["order"][inside], m["valid"][inside]))[0]
            best = min(best, (float(m["valid"][inside][j]), float(m["order"][inside][j]), int(doc[inside][j])))
    cut = max(plan.valid_fraction, min(0.1, MIN_VALID_BYTES / max(nbytes, 1)))
    held_docs = held_bytes = 0
    part_bytes[:] = 0
    for _, m, doc, _ in _kept(work, lang, tasks, status_dir):
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
        held_bytes += sum(int(m["size"][doc == forced].sum()) for _, m, doc, _ in _kept(work, lang, tasks, status_dir))
    train_docs = docs - held_docs
    return {"lang": lang, "parts": parts if train_docs else 0, "part_bytes": part_bytes.tolist(), "limit": limit,
            "cut": cut, "forced": forced, "docs": docs, "bytes": nbytes, "train_docs": train_docs,
            "train_bytes": nbytes - held_bytes}


def lang_plans(work: Path, plan: Plan) -> dict[str, dict]:
    return {lang: read_json(work / "dedup" / lang / "plan.json") for lang in languages(work, plan)}


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
    tasks = list(extracted(work, plan)[lang])
    picked = []  # (order, number, task, index in task)
    for t, m, doc, index in _kept(work, lang, tasks, work / "dedup" / lang):
        part = part_of(m["order"], lp["parts"])
        sel = (part == k) & _included(m["order"], doc, part, lp["limit"])
        picked += zip(m["order"][sel].tolist(), doc[sel].tolist(), [t] * int(sel.sum()), index[sel].tolist(),
                      m["valid"][sel].tolist(), strict=True)
    texts: dict[tuple[int, int], str] = {}
    for t in sorted({p[2] for p in picked}):
        r = DocReader(segment(work, t, lang))
        for i in sorted(p[3] for p in picked if p[2] == t):  # in file order
            texts[t, i] = r.text(i)
        r.close()
    picked.sort(key=lambda p: (p[0], p[1]))
    rng = np.random.default_rng([plan.seed, k, *lang.encode()])
    with staged_dir(work / "split" / lang / f"{k:04d}") as folder:
        files = {s: open(folder / f"{s}.jsonl", "w", encoding="utf-8") for s in SPLITS}
        with files["train"], files["valid"], open(folder / "sample.txt", "w", encoding="utf-8") as sample:
            for _order, doc, t, i, valid in picked:
                text, source = texts.pop((t, i)), plan.tasks[t].source
                split = "valid" if valid < lp["cut"] or doc == lp["forced"] else "train"
                files[split].write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
                if split == "train":
                    for line in training_lines(text):
                        for _ in range(int(rate) + int(rng.random() < rate % 1)):
                            sample.write(line + "\n")


def read_jsonl_texts(path: Path) -> Iterator[tuple[str, str]]:
    """(text, source) of a text part."""
    with open(path, encoding="utf-8") as f:
        for _, row in jsonl_rows(f, path):
            yield row["text"], row["source"]


# --------------------------------------------------------------------------------------------------
# encode


def encode_unit(work: Path, plan: Plan | None, lang: str, k: int, batch_docs: int = 2048) -> None:
    """Token files of part k of a language (work/split/<lang>/<k>/{train,valid}.jsonl, records with "text" and
    "source", encoded with work/tokenizer.model), with documents, bytes and tokens per source and the validation
    split's characters and words (its fertility). The plan is not needed: the part's files say it all."""
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
                        stats[f"{split}\t{source}\tdocs"] += 1
                        stats[f"{split}\t{source}\tbytes"] += len(text.encode("utf-8"))
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
    elif stage == "pairs":
        pairs_unit(work, plan, *pair_units(work, plan)[i])
    elif stage == "verify":
        verify_unit(work, plan, *pair_units(work, plan)[i])
    elif stage == "dedup":
        dedup_unit(work, plan, i)
    else:
        lang, k = part_units(work, plan)[i]
        (split_unit if stage == "split" else encode_unit)(work, plan, lang, k)
