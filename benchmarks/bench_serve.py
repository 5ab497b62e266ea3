"""Throughput and latency of `palmkit serve` with 1, 4 and 16 concurrent clients.

The server runs in its own process on loopback, on a random `--preset` model (or `--checkpoint DIR`), so the
clients' threads do not share its interpreter. Each client sends completions one after another (a closed
loop); every request is a prompt of `--prompt-tokens` random token ids and generates exactly `--max-tokens`
greedy tokens (`ignore_eos`), so levels differ only in how many requests the engine batches. A level stops
after `--requests` requests (at least 2 per client) or `--seconds`, whichever comes first.

"Ratio" is the completion-token throughput over that of one client at a time: sequential serving.
"Batch" is the mean number of sequences per decode step, from the server's /metrics.

    python benchmarks/bench_serve.py                              # small preset, 1 / 4 / 16 clients
    python benchmarks/bench_serve.py --checkpoint runs/ckpt --concurrency 1 8 32
    python benchmarks/bench_serve.py --layouts                    # also time the KV-cache layouts of a step
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from palmkit.infer.engine import Engine
from palmkit.model.checkpoint import load_checkpoint
from palmkit.model.palm import KVCache

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import make_checkpoint  # a random preset model saved as a checkpoint folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, max_batch: int, threads: int, timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """`palmkit serve` in a subprocess; returns it and its base URL once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "palmkit.cli", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
           "--max-batch", str(max_batch), "--max-queue", "4096", "--model-name", "bench", "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start in time")


def server_counter(base: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", httpx.get(f"{base}/metrics").text, re.M).group(1))


def run_level(base: str, clients: int, requests: int, seconds: float, prompt_tokens: int, max_tokens: int,
              vocab: int) -> dict:
    """Drive `clients` closed-loop clients; throughput, latency percentiles and the server's mean batch."""
    per_client = max(2, -(-requests // clients))
    latencies: list[float] = []
    tokens = [0]
    steps0, done0 = server_counter(base, "palmkit_decode_steps_total"), server_counter(
        base, "palmkit_completion_tokens_total")
    start = time.perf_counter()
    deadline = start + seconds

    def client(k: int) -> None:
        rng = random.Random(k)
        with httpx.Client(timeout=600) as http:
            for _ in range(per_client):
                if time.perf_counter() > deadline:
                    return
                prompt = [1] + [rng.randrange(4, vocab) for _ in range(prompt_tokens - 1)]
                t0 = time.perf_counter()
                r = http.post(f"{base}/v1/completions", json={"model": "bench", "prompt": prompt, "temperature": 0,
                                                               "max_tokens": max_tokens, "ignore_eos": True})
                r.raise_for_status()
                latencies.append(time.perf_counter() - t0)
                tokens[0] += r.json()["usage"]["completion_tokens"]

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    steps = server_counter(base, "palmkit_decode_steps_total") - steps0
    done = server_counter(base, "palmkit_completion_tokens_total") - done0
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"clients": clients, "requests": len(latencies), "tok_s": tokens[0] / wall, "req_s": len(latencies) / wall,
            "p50": q[49], "p99": q[98], "batch": (done - len(latencies)) / max(steps, 1)}


@torch.inference_mode()
def compare_layouts(model, busy: int, slots: int, cached: int, repeats: int = 30) -> dict[str, float]:
    """Median ms of one decode step of `busy` sequences in a `slots`-row cache, in three layouts."""
    cfg = model.config
    cache = KVCache(cfg, slots, min(cfg.max_seq_len, cached + 2))
    for t in cache.k + cache.v:
        t.normal_()  # any values: only the time is measured
    last = torch.randint(4, 400, (busy, 1))
    pos = torch.full((busy, 1), cached)
    spread = torch.arange(busy) * (slots // busy)  # busy rows scattered over the cache, as without packing

    def packed() -> None:  # the server's layout: busy rows kept in slots 0..busy-1, a view
        model(last, pos, cache=cache.rows(slice(0, busy)))

    def all_slots() -> None:  # every slot stepped, idle ones fed a pad token at position 0 and ignored
        ids, p = torch.zeros(slots, 1, dtype=torch.long), torch.zeros(slots, 1, dtype=torch.long)
        ids[spread], p[spread] = last, pos
        model(ids, p, cache=cache)

    def gathered() -> None:  # busy rows copied out (only the cached positions), their new column copied back
        sub = KVCache.__new__(KVCache)
        sub.k, sub.v = [k[spread, :, : cached + 1] for k in cache.k], [v[spread, :, : cached + 1] for v in cache.v]
        model(last, pos, cache=sub)
        for full, part in zip(cache.k + cache.v, sub.k + sub.v, strict=True):
            full[spread, :, cached] = part[:, :, cached]

    layouts = {"packed view": packed, "all slots, idle ignored": all_slots, "gather/scatter": gathered}
    times: dict[str, list[float]] = {name: [] for name in layouts}
    for rep in range(repeats + 3):  # round-robin, so that load from elsewhere hits every layout alike
        for name, fn in layouts.items():
            t0 = time.perf_counter()
            fn()
            if rep >= 3:  # the first rounds warm up
                times[name].append(time.perf_counter() - t0)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="serve this checkpoint instead of a random --preset model")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=16, help="requests per level (at least 2 per client)")
    ap.add_argument("--seconds", type=float, default=90, help="time limit per level")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the server (0: torch's default)")
    ap.add_argument("--layouts", action="store_true", help="also time one decode step in three cache layouts")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else make_checkpoint(Path(tmp), args.preset)
        model, tok, _ = load_checkpoint(ckpt)
        vocab = min(tok.vocab_size, model.config.vocab_size)
        name = args.checkpoint or f"random `{args.preset}` preset"
        print(f"model: {name}, {model.num_params() / 1e6:.1f}M parameters; {os.cpu_count()} CPUs "
              f"({platform.processor() or platform.machine()}), torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads")
        print(f"each request: {args.prompt_tokens} prompt tokens, {args.max_tokens} generated (greedy, ignore_eos); "
              f"server --max-batch {args.max_batch}\n")
        if args.layouts:
            print("| decode step layout | busy / slots | ms per step |\n|---|---|---|")
            for busy in (4, 12):
                for layout, ms in compare_layouts(model, busy, args.max_batch, cached=200).items():
                    print(f"| {layout} | {busy} / {args.max_batch} | {ms:.1f} |")
            rows = Engine(model, tok, args.max_batch).tune_step_rows()[1:]
            print(f"\nrows the engine steps for 1..{args.max_batch} running sequences (tuned): {rows}\n")
        del model
        proc, base = start_server(ckpt, args.max_batch, args.threads)
        try:
            run_level(base, 1, 1, 60, args.prompt_tokens, 8, vocab)  # warm-up
            rows = [run_level(base, c, args.requests, args.seconds, args.prompt_tokens, args.max_tokens, vocab)
                    for c in args.concurrency]
        finally:
            proc.terminate()
            proc.wait(30)
    base_rate = rows[0]["tok_s"] if rows[0]["clients"] == 1 else float("nan")
    print("| clients | requests | completion tok/s | requests/s | p50 latency s | p99 latency s | batch | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['tok_s']:.0f} | {r['req_s']:.2f} | {r['p50']:.2f} | "
              f"{r['p99']:.2f} | {r['batch']:.1f} | {r['tok_s'] / base_rate:.1f}x |")


if __name__ == "__main__":
    main()
