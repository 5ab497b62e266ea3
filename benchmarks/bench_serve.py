"""Throughput and latency of `palmkit serve` with 1, 4 and 16 concurrent clients, or against `transformers serve`.

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

With `--peer transformers` the checkpoint's `palmkit export` folder is also served by `transformers serve
--continuous-batching` (needs the `bench` extra's accelerate; offline), each server in turn, under the same
closed-loop loads of text prompts in English, German and Chinese (`--requests-per-client` each, streamed, greedy,
exactly `--max-tokens` tokens) at every `--concurrency`, plus a mixed load (`--mixed` clients, one in four sending
a `--long-tokens` prompt). It prints tokens/s, p50/p99 latency and time to first token of both, and the ratio;
`--baseline-batch 16` adds palmkit at a fixed batch of 16:

    python benchmarks/bench_serve.py --checkpoint CKPT --peer transformers --concurrency 1 4 16 32 64 \
        --requests-per-client 1 --mixed 8 --baseline-batch 16

With `--peer llama.cpp` the peer is llama.cpp's `llama-server` (palmkit.model.llamacpp's cached build) on the
checkpoint's own GGUF export (palmkit.model.gguf_export) in the weights' dtype (`--dtype bfloat16`: a bf16 GGUF),
with as many parallel slots as the most clients, `--threads` threads for both servers, the same loads and
clients. `--no-stream` sends every request without streaming (time to first token is then the latency):

    python benchmarks/bench_serve.py --preset mini --peer llama.cpp --threads 2 --concurrency 1 4 16 64 \
        --requests-per-client 2 --mixed 8 --long-tokens 600 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
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
from palmkit.model.export import export_hf
from palmkit.model.palm import KVCache

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import make_checkpoint  # a random preset model saved as a checkpoint folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, max_batch: int | None, threads: int, timeout: float = 180,
                 dtype: str = "float32", extra: list[str] = ()) -> tuple[subprocess.Popen, str]:
    """`palmkit serve` in a subprocess (None: its default batch; `extra`: more of its options); returns it and its
    base URL once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "palmkit.cli", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
           "--engine.max_queue", "4096", "--model_name", "bench", "--server.log_level", "warning",
           "--engine.dtype", dtype]
    cmd += [*(["--engine.max_batch", str(max_batch)] if max_batch else []), *extra]
    return start_process(cmd, port, threads, timeout)


def start_llama_server(gguf_file: Path, threads: int, slots: int, context: int,
                       timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """llama.cpp's `llama-server` on a GGUF file: `slots` sequences decoded together, each of `context` tokens."""
    from palmkit.model.llamacpp import llama_cpp_bin

    port = free_port()
    threads = threads or os.cpu_count() or 1
    cmd = [str(llama_cpp_bin() / "llama-server"), "-m", str(gguf_file), "--host", "127.0.0.1", "--port", str(port),
           "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c", str(slots * context)]
    return start_process(cmd, port, threads, timeout)


def start_transformers(export: Path, threads: int, context: int, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """`transformers serve --continuous-batching EXPORT` offline; its paged KV cache holds 64 requests of `context`
    tokens (its CPU default reserves over 10 GB, more than this shared machine can spare)."""
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("transformers")), "serve", "--continuous-batching", "--host",
           "127.0.0.1", "--port", str(port), "--device", "cpu", "--log-level", "warning",
           "--cb-block-size", "32", "--cb-num-blocks", str(64 * -(-context // 32)), str(export)]
    return start_process(cmd, port, threads, timeout, {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})


def start_process(cmd: list[str], port: int, threads: int, timeout: float,
                  env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Start a server; returns it and its base URL once /health answers."""
    env = {**os.environ, **(env or {}), **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    # a file, not a pipe: a server that logs every request would block once a pipe nobody reads is full
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited: {log.read()[-3000:]}")
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


# Short requests in the three languages of the quickstart corpus, as a chat client would send them.
PROMPTS = [
    "The history of the city begins", "Photosynthesis is the process by which", "In the morning the market",
    "Die Geschichte der Stadt beginnt", "Am Abend gingen wir", "Der Bahnhof liegt",
    "这座城市的历史", "今天早上我们",
]
LONG_TEXT = {  # repeated up to about `--long-tokens` tokens: a document pasted into a prompt
    "en": "The river runs through the old town, past the church and the market square, where traders meet. ",
    "de": "Der Fluss fließt durch die Altstadt, vorbei an der Kirche und dem Marktplatz, wo sich Händler treffen. ",
    "zh": "这条河流经老城区，经过教堂和集市广场，商人们在那里见面。",
}


def long_prompts(tokenizer, tokens: int) -> list[str]:
    """One prompt per language of at least `tokens` tokens (by the served tokenizer), ending in a question."""
    out = []
    for text in LONG_TEXT.values():
        reps = 1
        while len(tokenizer.encode(text * reps)) < tokens:
            reps += 1
        out.append(text * reps + " Summary:")
    return out


def exactly(server: str, n: int) -> dict:
    """The request fields that make `server` generate exactly n tokens (past an end of text)."""
    if server.startswith("palmkit") or server == "llama.cpp":
        return {"ignore_eos": True}
    return {"generation_config": json.dumps({"max_new_tokens": n, "min_new_tokens": n, "do_sample": False})}


def stream(http: httpx.Client, base: str, model: str, prompt: str, max_tokens: int,
           extra: dict) -> tuple[float, float, int]:
    """(latency, time to first token, completion tokens) of one greedy streamed completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    t0 = time.perf_counter()
    first, tokens = None, 0
    with http.stream("POST", f"{base}/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c.get("text") for c in chunk.get("choices") or ()):
                first = time.perf_counter() - t0
            tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    latency = time.perf_counter() - t0
    return latency, latency if first is None else first, tokens


def complete(http: httpx.Client, base: str, model: str, prompt: str, max_tokens: int,
             extra: dict) -> tuple[float, float, int]:
    """`stream`'s (latency, time to first token, completion tokens) of a non-streamed completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    t0 = time.perf_counter()
    r = http.post(f"{base}/v1/completions", json=body)
    r.raise_for_status()
    latency = time.perf_counter() - t0
    return latency, latency, r.json()["usage"]["completion_tokens"]


def closed_loop(base: str, model: str, work: list[list[str]], max_tokens: int, extra: dict,
                streamed: bool = True) -> dict:
    """Client k sends work[k]'s prompts one after another; throughput, latency and TTFT percentiles (all
    requests, and the short ones alone: those under 200 characters)."""
    results: list[tuple[str, float, float, int]] = []

    def client(prompts: list[str]) -> None:
        with httpx.Client(timeout=900) as http:
            for prompt in prompts:
                send = stream if streamed else complete
                results.append((prompt, *send(http, base, model, prompt, max_tokens, extra)))

    start = time.perf_counter()
    with ThreadPoolExecutor(len(work)) as pool:
        list(pool.map(client, work))
    wall = time.perf_counter() - start

    def pct(values: list[float], q: int) -> float:
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]

    short = [r for r in results if len(r[0]) < 200]
    return {"requests": len(results), "tok_s": sum(r[3] for r in results) / wall, "tokens": sum(r[3] for r in results),
            "p50": pct([r[1] for r in results], 50), "p99": pct([r[1] for r in results], 99),
            "ttft50": pct([r[2] for r in results], 50), "ttft99": pct([r[2] for r in results], 99),
            "short_ttft50": pct([r[2] for r in short], 50), "short_ttft99": pct([r[2] for r in short], 99)}


def workloads(levels: list[int], per_client: int, mixed: int, longs: list[str]) -> dict[str, list[list[str]]]:
    """Prompts per client of each load: `clients` clients cycling through PROMPTS; the mixed load has one client
    in four sending long prompts (one each) and the others short chat turns."""
    loads = {str(c): [[PROMPTS[(k + i) % len(PROMPTS)] for i in range(per_client)] for k in range(c)]
             for c in levels}
    if mixed:
        loads[f"mixed {mixed}"] = [[longs[k // 4 % len(longs)]] if k % 4 == 3 else
                                   [PROMPTS[(k + i) % len(PROMPTS)] for i in range(per_client)]
                                   for k in range(mixed)]
    return loads


def baseline_name(args) -> str:
    return " ".join(["palmkit", *([f"--max_batch {args.baseline_batch}"] if args.baseline_batch else []),
                     *([args.baseline_args] if args.baseline_args else [])])


def compare_peer(args, ckpt: Path, tokenizer) -> None:
    """Each server in turn on the same weights and the same loads; a table with the ratio palmkit / peer."""
    peer = args.peer
    with tempfile.TemporaryDirectory() as tmp:
        longs = long_prompts(tokenizer, args.long_tokens)
        loads = workloads(args.concurrency, args.requests_per_client, args.mixed, longs)
        context = args.long_tokens + 2 * args.max_tokens
        if peer == "llama.cpp":
            from palmkit.model.gguf_export import export_gguf

            gguf_file = export_gguf(ckpt, Path(tmp) / "model.gguf", "bf16" if args.dtype == "bfloat16" else "f32")
            slots = max([*args.concurrency, args.mixed])
            start_peer = lambda: (*start_llama_server(gguf_file, args.threads, slots, context), "bench")
        else:
            export = Path(args.export) if args.export else export_hf(ckpt, Path(tmp) / "export")
            start_peer = lambda: (*start_transformers(export, args.threads, context), str(export))
        servers = {"palmkit": lambda: (*start_server(ckpt, args.max_batch, args.threads, dtype=args.dtype), "bench"),
                   peer: start_peer}
        if args.baseline_batch or args.baseline_args:  # the same server with other settings, beside the defaults
            servers[baseline_name(args)] = lambda: (*start_server(
                ckpt, args.baseline_batch or None, args.threads, dtype=args.dtype, extra=args.baseline_args.split()),
                "bench")
        results: dict[str, dict[str, dict]] = {}
        for name, start in servers.items():
            proc, base, model = start()
            try:
                closed_loop(base, model, [PROMPTS[:1]], 8, exactly(name, 8), not args.no_stream)  # warm-up
                results[name] = {}
                for load, work in loads.items():
                    results[name][load] = r = closed_loop(base, model, work, args.max_tokens,
                                                          exactly(name, args.max_tokens), not args.no_stream)
                    print(f"{name} {load}: {r['tok_s']:.0f} tok/s ({r['tokens']} tokens), p50 {r['p50']:.2f} s, "
                          f"p99 {r['p99']:.2f} s, TTFT p50 {r['ttft50']:.3f} s, short TTFT p50 / p99 "
                          f"{r['short_ttft50']:.3f} / {r['short_ttft99']:.3f} s", flush=True)
            finally:
                proc.terminate()
                proc.wait(60)
    base = baseline_name(args)
    if args.baseline_batch or args.baseline_args:
        print(f"\n| clients | palmkit tok/s | {base} tok/s | ratio | palmkit p99 s | {base} p99 s |")
        print("|---|---|---|---|---|---|")
        for load in loads:
            a, b = results["palmkit"][load], results[base][load]
            print(f"| {load} | {a['tok_s']:.0f} | {b['tok_s']:.0f} | {a['tok_s'] / b['tok_s']:.2f}x | {a['p99']:.2f} | "
                  f"{b['p99']:.2f} |")
    print(f"\n{'non-streamed' if args.no_stream else 'streamed'}, --dtype {args.dtype}, --threads {args.threads}")
    print(f"| clients | requests | palmkit tok/s | {peer} tok/s | ratio | palmkit p50 / p99 s | "
          f"{peer} p50 / p99 s | palmkit TTFT p50 / p99 s | {peer} TTFT p50 / p99 s | "
          f"short-request TTFT p50 / p99 s (palmkit; {peer}) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for load in loads:
        a, b = results["palmkit"][load], results[peer][load]
        print(f"| {load} | {a['requests']} | {a['tok_s']:.0f} | {b['tok_s']:.0f} | {a['tok_s'] / b['tok_s']:.2f}x | "
              f"{a['p50']:.2f} / {a['p99']:.2f} | {b['p50']:.2f} / {b['p99']:.2f} | "
              f"{a['ttft50']:.3f} / {a['ttft99']:.3f} | {b['ttft50']:.3f} / {b['ttft99']:.3f} | "
              f"{a['short_ttft50']:.3f} / {a['short_ttft99']:.3f}; {b['short_ttft50']:.3f} / {b['short_ttft99']:.3f} |")


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
    ap.add_argument("--max-batch", type=int, default=None, help="palmkit serve --max_batch (default: its own)")
    ap.add_argument("--dtype", default="float32", help="palmkit serve --dtype")
    ap.add_argument("--baseline-batch", type=int, default=0, help="with --peer: also palmkit serve --max_batch N")
    ap.add_argument("--baseline-args", default="", help="with --peer: also palmkit serve with these options "
                    "(with --baseline-batch: both)")
    ap.add_argument("--peer", choices=["transformers", "llama.cpp"], help="also run `transformers serve "
                    "--continuous-batching` on the checkpoint's export, or llama.cpp's `llama-server` on its GGUF "
                    "export, the same loads on text prompts, and print the ratio")
    ap.add_argument("--no-stream", action="store_true", help="with --peer: non-streamed requests")
    ap.add_argument("--export", help="with --peer: a `palmkit export` folder of --checkpoint (default: export it)")
    ap.add_argument("--requests-per-client", type=int, default=2, help="with --peer: requests each client sends")
    ap.add_argument("--mixed", type=int, default=8, help="with --peer: clients of the mixed load (0: none)")
    ap.add_argument("--long-tokens", type=int, default=1000, help="with --peer: the mixed load's long prompts")
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
        if args.peer:
            del model
            return compare_peer(args, ckpt, tok)
        print(f"each request: {args.prompt_tokens} prompt tokens, {args.max_tokens} generated (greedy, ignore_eos); "
              f"server --max_batch {args.max_batch or 'default'}\n")
        if args.layouts:
            print("| decode step layout | busy / slots | ms per step |\n|---|---|---|")
            for busy in (4, 12):
                for layout, ms in compare_layouts(model, busy, args.max_batch or 16, cached=200).items():
                    print(f"| {layout} | {busy} / {args.max_batch} | {ms:.1f} |")
            rows = Engine(model, tok, args.max_batch or 16).tune_step_rows()[1:]
            print(f"\nrows the engine steps for 1..{args.max_batch or 16} running sequences (tuned): {rows}\n")
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
