"""Fine-tuning speed on the training engine: examples/s in float32 and bfloat16, on 1 and 2 processes, beside the
same model's pretraining step per token; and (--old-src) pretraining's loop against an older palmkit's.

Fine-tuning is `palmkit finetune classify` as a user runs it (a subprocess; torchrun for 2 processes, each on
one thread so that the two share the cores one process would use) on a synthetic two-class task that a model
learns from scratch (which animal a sentence of filler words mentions), so the validation accuracy of fp32 and
bf16 can be compared. Its examples/s is the median over the run's logged steps after the first two. The
pretraining row runs the engine's step with the causal-LM loss on random tokens of the same batch shape in this
process. --old-src SRC times `palmkit pretrain` from SRC (e.g. `git archive main src | tar -x -C /tmp/old`)
against this checkout's, alternating, on a corpus built from the test fixtures.

    python benchmarks/bench_finetune.py                          # mini preset: ~5 min on 2 cores
    python benchmarks/bench_finetune.py --old-src /tmp/old/src   # and the pretraining loop, old against new
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from palmkit.model.checkpoint import save_checkpoint
from palmkit.model.palm import build_model, preset
from palmkit.model.tokenizer import train_tokenizer
from palmkit.train.config import EngineConfig
from palmkit.train.distributed import Dist
from palmkit.train.engine import Engine, LRSchedule
from palmkit.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "fixtures" / "sample.txt"
FILLER = ("the a of and to in is was for on with as by at from this that which model data text word token "
          "quick lazy over under before after many few some river city house garden light stone").split()


def task_file(path: Path, n: int, words: int, seed: int = 0) -> Path:
    """Which animal does the sentence mention? `words` random filler words around one key word."""
    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "animal"])
        for i in range(n):
            text = [rng.choice(FILLER) for _ in range(words)]
            key = ("fox", "dog")[i % 2]
            text.insert(rng.randrange(words + 1), key)
            w.writerow([" ".join(text), key])
    return path


def finetune_run(args, ckpt: Path, data: Path, out: Path, dtype: str, nproc: int) -> dict:
    """One `palmkit finetune classify` run: its median examples/s, best accuracy and tokens per example."""
    opts = {"epochs": args.epochs, "batch_size": args.batch, "max_len": args.max_len, "lr": 1e-3,
            "dtype": dtype, "log_every": 1, "max_valid": 400, "dropout": 0.1}
    cmd = ["-m", "palmkit.cli", "finetune", "classify", "--checkpoint", str(ckpt), "--out", str(out),
           "--data.train_file", str(data), "--data.text_field", "sentence", "--data.label_field", "animal", "--force",
           *(a for k, v in opts.items() for a in (f"--train.{k}", str(v)))]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if nproc > 1:
        cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd]
        env["OMP_NUM_THREADS"] = str(args.threads or max(1, (os.cpu_count() or 2) // nproc))
    r = subprocess.run([sys.executable, *cmd], env=env, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    records = read_metrics(out / "metrics.jsonl")
    speeds = [x["examples_per_s"] for x in records if "examples_per_s" in x][2:]
    accuracy = max(x["valid/accuracy"] for x in records if "valid/accuracy" in x)
    return {"ex_s": statistics.median(speeds), "accuracy": accuracy}


def pretrain_tokens_per_s(cfg, shape: tuple[int, int], dtype: str, steps: int) -> float:
    """The engine's pretraining step (causal-LM loss, AdamW, clip) on random tokens: median tokens/s."""
    model = build_model(cfg, seed=0).train()
    engine = Engine(model, EngineConfig(dtype=dtype), Dist(), 1e-3, LRSchedule(0, steps))
    x = torch.randint(0, cfg.vocab_size, (shape[0], shape[1] + 1))
    batch = [((x[:, :-1], x[:, 1:]), x[:, 1:].numel())]
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        engine.train_step(batch, lambda m, b: m(b[0], targets=b[1]), i)
        times.append(time.perf_counter() - t0)
    return x[:, 1:].numel() / statistics.median(times[2:])


def make_corpus(root: Path, tok) -> Path:
    """A small built corpus (text, tokenizer, shards) from the test fixtures' sample text, as tests/conftest.py."""
    from palmkit.data.corpus.build import shard_text

    lines = SAMPLE.read_text(encoding="utf-8").splitlines()
    rng = random.Random(0)
    langs = {"en": lines[0:3] + lines[11:13], "de": lines[3:5], "zh": lines[9:10]}
    for lang, pool in langs.items():
        (root / "text" / lang).mkdir(parents=True, exist_ok=True)
        docs = [" ".join(rng.sample(pool, len(pool))) for _ in range(400)]
        for split, chunk in (("train", docs[:350]), ("valid", docs[350:])):
            with open(root / "text" / lang / f"{split}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps({"text": d, "source": "sample"}, ensure_ascii=False) + "\n" for d in chunk)
    tok_path = root / "tokenizer.model"
    tok_path.write_bytes(Path(tok.path).read_bytes())
    shard_text(root)
    return root


def pretrain_loop(src: str, corpus: Path, out: Path, args) -> tuple[float, float]:
    """`palmkit pretrain` from the source folder `src`: (median tokens/s over its steps after the first two, CPU
    seconds of the whole run), the second less sensitive to other processes' load than wall-clock time."""
    opts = {"preset": args.preset, "seq_len": 128, "batch_tokens": 128 * 16, "micro_batch": 16,
            "max_steps": args.pretrain_steps, "eval_every": 0, "save_every": 0, "log_every": 1, "warmup_steps": 2}
    cmd = [sys.executable, "-m", "palmkit.cli", "pretrain", "--data", str(corpus), "--out", str(out),
           *(a for k, v in opts.items() for a in (f"--train.{k}", str(v)))]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": src}, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return statistics.median(x["tokens_per_s"] for x in read_metrics(out / "metrics.jsonl") if "tokens_per_s" in x
                             and x["step"] > 2), cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--examples", type=int, default=800, help="examples in the task file (10%% valid, 10%% test)")
    ap.add_argument("--words", type=int, default=40, help="filler words per example")
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--nprocs", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2, help="rounds over every configuration, interleaved")
    ap.add_argument("--old-src", default="", help="an older palmkit's src folder: time its pretraining loop too")
    ap.add_argument("--pretrain-steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=0,
                    help="threads per process (0: the cores / processes); 1 on a shared 2-core machine")
    ap.add_argument("--skip-finetune", action="store_true", help="only the pretraining loop (with --old-src)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_finetune."))
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()
    tok = train_tokenizer(lines * 4 + FILLER + ["fox", "dog"], work / "tok.model", vocab_size=600)
    cfg = preset(args.preset, vocab_size=tok.vocab_size)
    save_checkpoint(work / "ckpt", build_model(cfg, seed=0), tok)
    data = task_file(work / "task.csv", args.examples, args.words)
    with open(data, encoding="utf-8") as f:
        texts = [row["sentence"] for row in csv.DictReader(f)]
    per_example = statistics.mean(min(len(tok.encode(t)) + 1, args.max_len) for t in texts)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, {args.preset} "
          f"preset ({build_model(cfg).num_params() / 1e6:.1f}M parameters), batch {args.batch} examples of "
          f"{per_example:.0f} tokens on average, load average {os.getloadavg()[0]:.2f}", flush=True)
    runs: dict[tuple[str, int], list[dict]] = {(d, n): [] for d in args.dtypes for n in args.nprocs}
    pre: dict[str, list[float]] = {d: [] for d in args.dtypes}
    for r in range(0 if args.skip_finetune else args.repeats):
        for (dtype, nproc), got in runs.items():
            got.append(finetune_run(args, work / "ckpt", data, work / f"ft-{dtype}-{nproc}", dtype, nproc))
            print(f"repeat {r + 1} finetune {dtype} x{nproc}: {got[-1]['ex_s']:.1f} ex/s, accuracy "
                  f"{got[-1]['accuracy']:.3f}", flush=True)
        for dtype in args.dtypes:
            pre[dtype].append(pretrain_tokens_per_s(cfg, (args.batch, round(per_example)), dtype, 8))
            print(f"repeat {r + 1} pretraining step {dtype}: {pre[dtype][-1]:,.0f} tok/s", flush=True)

    if not args.skip_finetune:
        finetune_table(args, runs, pre, per_example)
    if args.old_src:
        pretrain_loop_table(args, tok, work)


def finetune_table(args, runs: dict, pre: dict, per_example: float) -> None:
    print(f"\nload average after {os.getloadavg()[0]:.2f}. Cells: median over {args.repeats} repeats (range).\n")
    print("| dtype | processes | fine-tune examples/s | fine-tune tokens/s | pretraining step tokens/s (1 process) "
          "| fine-tune / pretraining, per token | valid accuracy | vs float32, same processes |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for (dtype, nproc), got in runs.items():
        ex = [g["ex_s"] for g in got]
        base = [g["ex_s"] for g in runs.get((args.dtypes[0], nproc), got)]
        tok_s = statistics.median(ex) * per_example
        print(f"| {dtype} | {nproc} | {statistics.median(ex):.1f} ({min(ex):.1f}–{max(ex):.1f}) | {tok_s:,.0f} | "
              f"{statistics.median(pre[dtype]):,.0f} | {tok_s / statistics.median(pre[dtype]):.2f}x | "
              f"{statistics.median(g['accuracy'] for g in got):.3f} | "
              f"{statistics.median(ex) / statistics.median(base):.2f}x |")


def pretrain_loop_table(args, tok, work: Path) -> None:
    corpus = make_corpus(work / "corpus", tok)
    new_src = str(ROOT / "src")
    times: dict[str, list[float]] = {"old": [], "new": []}
    cpu: dict[str, list[float]] = {"old": [], "new": []}
    for r in range(args.repeats):
        for name, src in (("old", args.old_src), ("new", new_src)) if r % 2 == 0 else (("new", new_src),
                                                                                       ("old", args.old_src)):
            tok_s, seconds = pretrain_loop(src, corpus, work / f"pre-{name}-{r}", args)
            times[name].append(tok_s)
            cpu[name].append(seconds)
            print(f"repeat {r + 1} pretrain loop {name}: {tok_s:,.0f} tok/s, {seconds:.1f} CPU-s", flush=True)
    ratios = [n / o for o, n in zip(times["old"], times["new"], strict=True)]
    cpu_ratios = [o / n for o, n in zip(cpu["old"], cpu["new"], strict=True)]
    print(f"\nload average after {os.getloadavg()[0]:.2f}; ratios: median of the repeats' pairs (range)\n\n"
          f"| `palmkit pretrain`, {args.preset}, batch 16 x 128, {args.pretrain_steps} steps, bf16 | old | new | "
          f"new / old |\n|---|---:|---:|---:|\n"
          f"| tokens/s, median step | {statistics.median(times['old']):,.0f} | {statistics.median(times['new']):,.0f} "
          f"| {statistics.median(ratios):.2f}x ({min(ratios):.2f}–{max(ratios):.2f}) |\n"
          f"| CPU seconds, whole run (old / new) | {statistics.median(cpu['old']):.1f} | "
          f"{statistics.median(cpu['new']):.1f} | {statistics.median(cpu_ratios):.2f}x "
          f"({min(cpu_ratios):.2f}–{max(cpu_ratios):.2f}) |")


if __name__ == "__main__":
    main()
