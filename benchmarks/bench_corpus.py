"""Corpus build at scale: the streaming build beside the in-memory build it replaced, from 0.1 to several GB.

The input is the shipped corpus's text (the text/ folder of a built corpus, --base) written out again and again
with seeded edits until it reaches each size: a round's copy of a document is the same (an exact duplicate), lightly
edited (a near duplicate: ~2% of its words or characters changed), or heavily edited (its lines shuffled and a
third of its words changed: a new document). Each build runs in a fresh process; the table gives its wall time,
input MB/s, peak resident memory (that process and, separately, its largest child), and the duplicates removed.

Near-duplicate recall: of a sample of the light copies whose exact Jaccard similarity (character 5-grams) to their
original is at least the threshold, the share the build removed; false removals: the share of a sample of heavy
copies (mostly far below the threshold) removed. The same sample is scored by datasketch's MinHash (128
permutations) when it is installed, as an independent estimate of the similarities, with the recall that deciding
on its estimate alone would give.

The in-memory build is palmkit's own code at --old-commit (read with `git show`, imported under another name);
it runs where it fits (--old-max-gb). `--workers 1 2` builds with each number of worker processes (the outputs
are compared byte for byte, and the dedup stages' times side by side). `--datatrove` runs datatrove's own
four-stage MinHash pipeline (signatures, buckets, clusters, filter; its default configuration: word 5-grams, 14
bands of 8 hashes) on the same input, split into as many files as workers, with the same recall measure; its
words are split by a regular expression (words and punctuation), since its English tokenizer needs spaCy.

`--variants` writes a different input: a fixed share of the seed text (--originals-mb), each document followed
in later rounds by light variants of itself (about 5% of its words replaced, the way boilerplate and
re-crawled pages vary), so that the families of near duplicates grow with the input: at 20 MB of originals,
40 MB holds one variant of each document and 400 MB about nineteen.

    python benchmarks/bench_corpus.py --base /path/to/built/corpus --sizes 0.1 1 4 --out /tmp/bench-corpus
    python benchmarks/bench_corpus.py --base CORPUS --sizes 1 --workers 1 2 --datatrove --builds streaming
    python benchmarks/bench_corpus.py --base CORPUS --sizes 0.04 0.4 --variants --builds streaming
"""

from __future__ import annotations

import argparse
import filecmp
import gzip
import hashlib
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


RUN = """
import json, resource, sys, time
sys.path[:0] = {paths!r}
import {module} as corpus
# today's build takes its tokenizer and run options as dataclasses; the in-memory build of an older commit, flat
options = (dict(tokenizer=corpus.TokenizerOptions(vocab_size={vocab}), run=corpus.RunOptions(workers={workers}))
           if hasattr(corpus, "RunOptions") else dict(vocab_size={vocab}, workers={workers}))
t = time.perf_counter()
corpus.build({out!r}, langs="en", subset="none", inputs={inputs!r}, lang="en", **options{extra})
wall = time.perf_counter() - t
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
print("RESULT " + json.dumps({{"wall": wall, "cpu": cpu, "rss_mb": me.ru_maxrss / 1024,
                              "child_rss_mb": kids.ru_maxrss / 1024}}))
"""


def digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


def _tokens(text: str) -> tuple[list[str], str]:
    """Words, or characters for text written without spaces (Chinese, Japanese)."""
    return (text.split(" "), " ") if text.count(" ") > len(text) / 20 else (list(text), "")


def edit(text: str, rng: random.Random, rate: float, shuffle: bool) -> str:
    """`rate` of the words changed (half that of the characters of text without spaces: each changes five
    5-grams of characters, a word about twice as many), and the lines shuffled if `shuffle`."""
    if shuffle:
        lines = text.split("\n")
        rng.shuffle(lines)
        text = "\n".join(lines)
    toks, sep = _tokens(text)
    pool = toks[:200]
    for _ in range(max(1, int(len(toks) * (rate if sep else rate / 2)))):
        toks[rng.randrange(len(toks))] = rng.choice(pool) + rng.choice("xqzj")
    return sep.join(toks)


def originals(base: list[str], budget_bytes: float, seed: int) -> list[int]:
    """Indices of a seeded sample of the seed documents, about `budget_bytes` of text."""
    pool = list(range(len(base)))
    random.Random(seed).shuffle(pool)
    keep, total = [], 0
    for i in pool:
        if total >= budget_bytes:
            break
        keep.append(i)
        total += len(base[i].encode())
    return keep


def write_record(f, text: str) -> int:
    """Write one JSONL record; returns its size in bytes."""
    line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
    f.write(line)
    return len(line.encode())


def make_input(base: list[str], size_bytes: int, path: Path, seed: int, sample: int = 1500,
               original_share: float = 0.1) -> dict:
    """Write the perturbed input; returns a sample of (original, light copy) and heavy copies and the counts.

    The originals are a seeded sample of `original_share` of the input (all of the seed text once the input is
    larger than ten times it), so that every size has about the same mix of originals and copies."""
    rng = random.Random(seed)
    light, heavy, counts = [], [], {"exact": 0, "light": 0, "heavy": 0, "original": 0}
    keep = originals(base, size_bytes * original_share, seed)
    written, r = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_bytes:
            order = list(keep)
            random.Random(f"{seed}-{r}").shuffle(order)
            for i in order:
                doc = base[i]
                if r == 0:
                    kind, text = "original", doc
                else:
                    kind = rng.choices(["exact", "light", "heavy"], [0.15, 0.35, 0.5])[0]
                    # cleaned as the build cleans, so that the corpus holds each kept text as written here
                    text = doc if kind == "exact" else clean_text(edit(doc, rng, 0.02, False)) if kind == "light" \
                        else clean_text(edit(doc, rng, 0.33, True))
                counts[kind] += 1
                if kind == "light" and rng.random() < 0.05 and len(light) < sample:
                    light.append((doc, text))
                if kind == "heavy" and rng.random() < 0.05 and len(heavy) < sample:
                    heavy.append((doc, text))
                written += write_record(f, text)
                if written >= size_bytes:
                    break
            r += 1
    return {"light": light, "heavy": heavy, "counts": counts}


def make_variants(base: list[str], size_bytes: int, path: Path, seed: int, originals_bytes: int,
                  rate: float = 0.05, sample: int = 1500) -> dict:
    """Write the light-variant input: round 0 the originals (a seeded `originals_bytes` of the seed text),
    each later round a variant of every original with `rate` of its words replaced."""
    rng = random.Random(seed)
    keep = originals(base, originals_bytes, seed)
    light, counts, written, r = [], {"original": 0, "light": 0, "exact": 0, "heavy": 0}, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_bytes:
            for i in keep:
                text = base[i] if r == 0 else edit(base[i], rng, rate, False)
                counts["original" if r == 0 else "light"] += 1
                if r and rng.random() < 0.05 and len(light) < sample:
                    light.append((base[i], text))
                written += write_record(f, text)
                if written >= size_bytes:
                    break
            r += 1
    return {"light": light, "heavy": [], "counts": counts, "rounds": r}


def clean_text(text: str) -> str:
    from palmkit.data.corpus.clean import clean_text as clean

    return clean(text)


def shingles(text: str) -> set[str]:
    from palmkit.data.corpus.dedup import SHINGLE, normalise

    norm = normalise(text)
    return {norm[i:i + SHINGLE] for i in range(len(norm) - SHINGLE + 1)}


def kept_digests(out: Path, wanted: set[bytes]) -> set[bytes]:
    """Which of `wanted` (text digests) are in the built corpus."""
    found = set()
    for path in out.glob("text/*/*.jsonl"):
        with open(path, encoding="utf-8") as f:
            for line in f:
                d = digest(json.loads(line)["text"])
                if d in wanted:
                    found.add(d)
    return found


def datatrove_kept(out: Path, wanted: set[bytes]) -> set[bytes]:
    """Which of `wanted` are in datatrove's deduplicated output (.jsonl.gz files)."""
    found = set()
    for path in (out / "output").glob("*.jsonl.gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                d = digest(json.loads(line)["text"])
                if d in wanted:
                    found.add(d)
    return found


def quality(out: Path, made: dict, kept_of=kept_digests, estimates: bool = True) -> dict:
    from palmkit.data.corpus.dedup import NEAR_DUP, minhash, normalise, similarity

    scored = [(_jaccard(a, b), b) for a, b in made["light"]]
    true_pairs = [(j, b) for j, b in scored if j >= NEAR_DUP]
    wanted = {digest(b) for _, b in true_pairs} | {digest(h) for _, h in made["heavy"]}
    kept = kept_of(out, wanted)
    recall = sum(digest(b) not in kept for _, b in true_pairs) / max(1, len(true_pairs))
    false = sum(digest(h) not in kept for _, h in made["heavy"]) / max(1, len(made["heavy"]))
    result = {"recall": recall, "pairs": len(true_pairs), "false_removals": false,
              "heavy_jaccard_max": max((_jaccard(a, h) for a, h in made["heavy"][:300]), default=0.0),
              "below_threshold": sum(j < NEAR_DUP for j, _ in scored)}
    for lo, hi in ((NEAR_DUP, 0.85), (0.85, 0.9), (0.9, 1.01)):
        part = [b for j, b in true_pairs if lo <= j < hi]
        result[f"recall_{lo:.2f}"] = (sum(digest(b) not in kept for b in part) / max(1, len(part)), len(part))
    if not estimates:
        return result
    try:
        from datasketch import MinHash
    except ImportError:
        return result
    ours, theirs, found_ours, found_theirs = [], [], [], []
    for a, b in made["light"][:500]:
        exact = _jaccard(a, b)
        sa, sb = shingles(a), shingles(b)
        m1, m2 = MinHash(num_perm=128, seed=1), MinHash(num_perm=128, seed=1)
        m1.update_batch([s.encode() for s in sa])
        m2.update_batch([s.encode() for s in sb])
        est_theirs, est_ours = m1.jaccard(m2), similarity(minhash(normalise(a)), minhash(normalise(b)))
        theirs.append(abs(est_theirs - exact))
        ours.append(abs(est_ours - exact))
        if exact >= NEAR_DUP:  # what deciding on an estimate alone would find
            found_theirs.append(est_theirs >= NEAR_DUP)
            found_ours.append(est_ours >= NEAR_DUP)
    result["jaccard_error_ours"] = sum(ours) / max(1, len(ours))
    result["jaccard_error_datasketch"] = sum(theirs) / max(1, len(theirs))
    result["estimate_recall_ours"] = sum(found_ours) / max(1, len(found_ours))
    result["estimate_recall_datasketch"] = sum(found_theirs) / max(1, len(found_theirs))
    return result


def _jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / max(1, len(sa | sb))


def old_package(commit: str, folder: Path) -> Path:
    """palmkit's corpus package at `commit`, importable as `oldcorpus` (it still uses today's other modules)."""
    pkg = folder / "oldcorpus"
    pkg.mkdir(parents=True, exist_ok=True)
    for name in ("__init__", "build", "clean", "dedup", "extract", "readers", "report", "sources"):
        src = subprocess.run(["git", "show", f"{commit}:src/palmkit/data/corpus/{name}.py"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        (pkg / f"{name}.py").write_text(src.replace("palmkit.data.corpus.", "oldcorpus."), encoding="utf-8")
    return folder


def run_build(module: str, paths: list[str], out: Path, inputs: str, vocab: int, workers: int, extra: str = "",
              ) -> dict:
    code = RUN.format(paths=paths, module=module, out=str(out), inputs=inputs, vocab=vocab, workers=workers,
                      extra=extra)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    result = json.loads(proc.stdout.rsplit("RESULT ", 1)[1])
    report = (out / "report.md").read_text(encoding="utf-8")
    row = re.search(r"^\| en \| ([\d.]+) \| (\d+) \| [\d,]+ \| \d+ \| [\d.]+ \| (\d+) \| (\d+) \|", report, re.M)
    if row:
        result.update(kept_mb=float(row.group(1)), docs=int(row.group(2)), exact=int(row.group(3)),
                      near=int(row.group(4)))
    stages = re.search(r"Built in [\d.]+ s \(([^)]*)\)", report)
    result["stages"] = stages.group(1) if stages else ""
    return result


DATATROVE = """
import json, resource, sys, time
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                              MinhashDedupFilter, MinhashDedupSignature)
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers.jsonl import JsonlWriter
from datatrove.utils.word_tokenizers import WordTokenizer
from loguru import logger
logger.remove()

import datatrove.utils.hashes.xxhash as dt_xxhash
def xxhash64(data):  # the installed xxhash hashes bytes only: encode datatrove's str (imports: runs in its workers)
    import xxhash
    return xxhash.xxh64_intdigest(data.encode() if isinstance(data, str) else data)
dt_xxhash.xxhash64 = xxhash64

class Words(WordTokenizer):  # datatrove's English tokenizer is spaCy's (not installed): words and punctuation
    pattern = __import__("re").compile(r"\\w+|[^\\w\\s]")
    def word_tokenize(self, text): return self.pattern.findall(text)
    def sent_tokenize(self, text): return text.split("\\n")
    def span_tokenize(self, text): raise NotImplementedError

inputs, out, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
files = len(list(__import__("pathlib").Path(inputs).glob("*.jsonl")))
config = MinhashConfig()
t = time.perf_counter()
times = {}
def run(name, pipeline, tasks):
    t0 = time.perf_counter()
    LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(workers, tasks),
                          logging_dir=f"{out}/logs/{name}", skip_completed=False).run()
    times[name] = time.perf_counter() - t0
run("signatures", [JsonlReader(inputs), MinhashDedupSignature(f"{out}/signatures", config=config,
                                                                      language=Words())], files)
run("buckets", [MinhashDedupBuckets(f"{out}/signatures", f"{out}/buckets", config=config)], config.num_buckets)
run("clusters", [MinhashDedupCluster(f"{out}/buckets", f"{out}/remove_ids", config=config)], 1)
run("filter", [JsonlReader(inputs), MinhashDedupFilter(f"{out}/remove_ids"), JsonlWriter(f"{out}/output")], files)
wall = time.perf_counter() - t
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
print("RESULT " + json.dumps({"wall": wall, "cpu": cpu, "rss_mb": me.ru_maxrss / 1024,
                              "child_rss_mb": kids.ru_maxrss / 1024,
                              "stages": ", ".join(f"{k} {v:.0f} s" for k, v in times.items())}))
"""


def run_datatrove(data: Path, out: Path, workers: int) -> dict:
    """datatrove's MinHash pipeline on `data`, split into `workers` files (its readers give a file to a task)."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    shards = out / "input"
    shards.mkdir(parents=True)
    lines = data.read_text(encoding="utf-8").splitlines(keepends=True)
    step = -(-len(lines) // workers)
    for k in range(workers):
        (shards / f"{k:03d}.jsonl").write_text("".join(lines[k * step:(k + 1) * step]), encoding="utf-8")
    del lines
    proc = subprocess.run([sys.executable, "-c", DATATROVE, str(shards), str(out), str(workers)],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.rsplit("RESULT ", 1)[1])


def same_output(a: Path, b: Path) -> bool:
    """Whether two built corpora have byte-identical text, shards and tokenizer."""
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".bin", ".model"))
    return bool(files) and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def stage_seconds(stages: str, names: tuple[str, ...]) -> float:
    """Seconds of the named stages in a report's "Built in" line."""
    return sum(float(t) for name, t in re.findall(r"(\w+) ([\d.]+) s", stages) if name in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="a built corpus whose text/<lang>/*.jsonl is the seed text")
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.1, 1.0, 4.0], help="input sizes in GB")
    parser.add_argument("--out", default="/tmp/bench-corpus")
    parser.add_argument("--old-commit", default="d1efb32", help="the commit of the in-memory build")
    parser.add_argument("--old-max-gb", type=float, default=0.1, help="largest input for the in-memory build")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1], help="worker processes of the streaming "
                        "build: one build per number")
    parser.add_argument("--datatrove", action="store_true", help="also run datatrove's MinHash pipeline")
    parser.add_argument("--variants", action="store_true", help="light-variant families instead of the mix")
    parser.add_argument("--originals-mb", type=float, default=20.0, help="originals of --variants")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--builds", nargs="+", default=["streaming", "in-memory"], help="which builds to run")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = [json.loads(line)["text"] for p in sorted(Path(args.base).glob("text/*/*.jsonl"))
            for line in p.read_text(encoding="utf-8").splitlines()]
    print(f"seed text: {len(base)} documents, {sum(len(d.encode()) for d in base) / 1e6:.1f} MB", flush=True)
    old = old_package(args.old_commit, out / "old")
    results = []
    for gb in args.sizes:
        data = out / f"input-{gb:g}GB.jsonl"
        if args.variants:
            made = make_variants(base, int(gb * 1e9), data, args.seed, int(args.originals_mb * 1e6))
        else:
            made = make_input(base, int(gb * 1e9), data, args.seed)
        size = data.stat().st_size
        print(f"\n{gb:g} GB input: {size / 1e6:.0f} MB, {made['counts']}", flush=True)
        candidates = [(f"streaming-{w}w" if len(args.workers) > 1 else "streaming", "palmkit.data.corpus.build",
                       [str(ROOT / "src")], w) for w in args.workers]
        if gb <= args.old_max_gb:
            candidates.append(("in-memory", "oldcorpus.build", [str(old), str(ROOT / "src")], 2))
        candidates = [c for c in candidates if c[0].split("-")[0] in args.builds]
        for name, module, paths, workers in candidates:
            target = out / f"{name}-{gb:g}GB"
            t0 = time.perf_counter()
            result = run_build(module, paths, target, str(data), args.vocab, workers)
            result.update(name=name, gb=gb, input_mb=size / 1e6, workers=workers,
                          mb_s=size / 1e6 / result.get("wall", time.perf_counter() - t0))
            if "error" not in result:
                result.update(quality(target, made, estimates=not args.variants))
                result["dedup_s"] = stage_seconds(result["stages"], ("pairs", "verify", "dedup"))
                # what datatrove's four stages do: read, hash, find the pairs and clusters, write what is kept
                result["read_dedup_s"] = stage_seconds(result["stages"], ("extract", "pairs", "verify", "dedup"))
            results.append(result)
            print(json.dumps(result), flush=True)
        built = [r for r in results if r["gb"] == gb and r["name"].startswith("streaming-") and "error" not in r]
        for r in built[1:]:
            r["same_as_1"] = same_output(out / f"{built[0]['name']}-{gb:g}GB", out / f"{r['name']}-{gb:g}GB")
            print(f"{r['name']} vs {built[0]['name']}: dedup stages {r['dedup_s']:.0f} s / {built[0]['dedup_s']:.0f} s"
                  f" = x{r['dedup_s'] / max(built[0]['dedup_s'], 1e-9):.2f}, whole build x"
                  f"{r['wall'] / built[0]['wall']:.2f}, byte-identical output: {r['same_as_1']}", flush=True)
        if args.datatrove:
            w = max(args.workers)
            t0 = time.perf_counter()
            result = run_datatrove(data, out / f"datatrove-{gb:g}GB", w)
            # its pool's worker processes are not waited for, so that RUSAGE_CHILDREN does not count them
            result.update(cpu=float("nan"), child_rss_mb=float("nan"))
            result.update(name=f"datatrove-{w}w", gb=gb, input_mb=size / 1e6, workers=w,
                          mb_s=size / 1e6 / result.get("wall", time.perf_counter() - t0))
            if "error" not in result:
                result.update(quality(out / f"datatrove-{gb:g}GB", made, datatrove_kept, estimates=False))
                result["dedup_s"] = result["read_dedup_s"] = result["wall"]
            results.append(result)
            print(json.dumps(result), flush=True)
    print("\ninput MB/s: the whole run (extract + dedup stages / dedup stages alone; datatrove: its four stages)")
    print("\n| build | input GB | workers | wall s | CPU s | input MB/s | peak RSS MB (process / largest child) | "
          "kept MB | exact dups | near dups | near-dup recall | false removals |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['name']} | {r['gb']:g} | {r['workers']} | failed: {r['error']} ||||||||")
            continue
        print(f"| {r['name']} | {r['gb']:g} | {r['workers']} | {r['wall']:.0f} | {r.get('cpu', 0):.0f} | "
              f"{r['mb_s']:.2f} ({r['input_mb'] / max(r['read_dedup_s'], 1e-9):.2f} / "
              f"{r['input_mb'] / max(r['dedup_s'], 1e-9):.2f}) | "
              f"{r['rss_mb']:.0f} / {r['child_rss_mb']:.0f} | {r.get('kept_mb', '')} | {r.get('exact', '')} | "
              f"{r.get('near', '')} | {r['recall']:.3f} ({r['pairs']} pairs) | {r['false_removals']:.3f} |")
    stream = [r for r in results if r["name"].startswith("streaming") and r["workers"] == args.workers[0]
              and "error" not in r]
    if len(stream) >= 2:
        a, b = stream[0], stream[-1]
        print(f"\nstreaming {b['gb']:g} GB vs {a['gb']:g} GB: peak RSS x{b['rss_mb'] / a['rss_mb']:.2f}, "
              f"throughput x{b['mb_s'] / a['mb_s']:.2f} (1.00 = linear)")
    for r in results:
        print(f"{r['name']} {r['gb']:g} GB stages: {r.get('stages', '')}")
        buckets = ", ".join(f"J in [{k[7:]}, ...): {v[0]:.3f} of {v[1]}" for k, v in r.items()
                            if k.startswith("recall_"))
        if buckets:
            print(f"  near-dup recall by exact similarity to the original: {buckets}; "
                  f"largest similarity of a heavy copy to its original: {r['heavy_jaccard_max']:.2f}")
        if "jaccard_error_ours" in r:
            print(f"  mean |estimate - exact Jaccard| on the sample: palmkit {r['jaccard_error_ours']:.4f}, "
                  f"datasketch {r['jaccard_error_datasketch']:.4f}; recall deciding on the estimate alone: "
                  f"palmkit's 64 bins {r['estimate_recall_ours']:.3f}, datasketch's 128 permutations "
                  f"{r['estimate_recall_datasketch']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
