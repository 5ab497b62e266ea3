"""Unconstrained throughput of `palmkit serve` with and without one structured-output request in the batch.

The server (bench_serve.start_server) runs a random `--preset` model; `--clients` closed-loop clients send greedy
unconstrained completions of `--max-tokens` tokens (ignore_eos), as bench_serve.py does. Each round runs that
load alone, then again beside one more client that sends `json_schema` requests back to back (sampled, so their
JSON differs and every step of theirs computes a grammar mask). Rounds alternate `--rounds` times so that load from
elsewhere hits both alike; the figure is the unconstrained clients' completion tokens/s, and the ratio of the
medians (with / without). It also counts how many constrained completions validated against the schema.
`--baseline-src DIR` also serves the same checkpoint from another checkout's sources (e.g. the main branch's
`src`, before structured output existed) and runs the unconstrained load on it in every round, for the ratio of
this tree's unconstrained throughput to that one's.

    python benchmarks/bench_constrained.py --preset small --clients 8 --rounds 5 --baseline-src /work/main/src
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema_rs

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import make_checkpoint
from bench_serve import free_port, start_process, start_server

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "plan", "urgent"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "plan": {"enum": ["free", "pro", "team"]}, "urgent": {"type": "boolean"}}}


def unconstrained(base: str, clients: int, requests: int, max_tokens: int) -> float:
    """Completion tokens/s of `clients` closed-loop greedy clients, `requests` each."""
    tokens = [0]

    def client(k: int) -> None:
        with httpx.Client(timeout=600) as http:
            for i in range(requests):
                r = http.post(f"{base}/v1/completions", json={
                    "model": "bench", "prompt": f"Request {k} {i}", "temperature": 0, "max_tokens": max_tokens,
                    "ignore_eos": True})
                r.raise_for_status()
                tokens[0] += r.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return tokens[0] / (time.perf_counter() - start)


def constrained_loop(base: str, stop: threading.Event, counts: dict) -> None:
    """json_schema requests back to back until `stop`; counts completions and valid ones."""
    validator = jsonschema_rs.validator_for(SCHEMA)
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA, "strict": True}}
    with httpx.Client(timeout=600) as http:
        seed = 0
        while not stop.is_set():
            r = http.post(f"{base}/v1/chat/completions", json={
                "model": "bench", "messages": [{"role": "user", "content": "A ticket"}], "seed": seed,
                "response_format": fmt, "max_tokens": 200})
            r.raise_for_status()
            text = r.json()["choices"][0]["message"]["content"]
            counts["done"] += 1
            try:
                counts["valid"] += validator.is_valid(json.loads(text))
            except ValueError:
                pass
            seed += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4, help="requests per unconstrained client and round")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline-src", help="also serve from this source folder (PYTHONPATH) and load it alike")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp), args.preset)
        proc, base = start_server(checkpoint, None, 0)
        baseline = start_baseline(checkpoint, args.baseline_src) if args.baseline_src else None
        try:
            unconstrained(base, 1, 1, 8)  # warm-up
            alone, beside, before, counts = [], [], [], {"done": 0, "valid": 0}
            for _ in range(args.rounds):
                if baseline:
                    before.append(unconstrained(baseline[1], args.clients, args.requests, args.max_tokens))
                alone.append(unconstrained(base, args.clients, args.requests, args.max_tokens))
                stop = threading.Event()
                side = threading.Thread(target=constrained_loop, args=(base, stop, counts))
                side.start()
                beside.append(unconstrained(base, args.clients, args.requests, args.max_tokens))
                stop.set()
                side.join()
        finally:
            for p in (proc, *(baseline[:1] if baseline else ())):
                p.terminate()
                p.wait(30)
    print(f"{args.clients} unconstrained clients x {args.requests} requests of {args.max_tokens} greedy tokens, "
          f"{args.rounds} rounds, `{args.preset}` preset")
    print("| load | unconstrained completion tok/s (median) | rounds |\n|---|---|---|")
    if before:
        print(f"| alone, {args.baseline_src} | {statistics.median(before):.0f} | "
              f"{', '.join(f'{x:.0f}' for x in before)} |")
    print(f"| alone | {statistics.median(alone):.0f} | {', '.join(f'{x:.0f}' for x in alone)} |")
    print(f"| + 1 json_schema client | {statistics.median(beside):.0f} | {', '.join(f'{x:.0f}' for x in beside)} |")
    print(f"\nratio (with / without): {statistics.median(beside) / statistics.median(alone):.3f}; "
          f"constrained completions: {counts['valid']} of {counts['done']} valid")
    if before:
        print(f"this tree alone / {args.baseline_src} alone: {statistics.median(alone) / statistics.median(before):.3f}"
              f"; this tree with the constrained client / {args.baseline_src} alone: "
              f"{statistics.median(beside) / statistics.median(before):.3f}")


def start_baseline(checkpoint: Path, src: str):
    """`palmkit serve` from another checkout's sources (its own command-line options)."""
    port = free_port()
    cmd = [sys.executable, "-m", "palmkit.cli", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
           "--engine.max_queue", "4096", "--model_name", "bench"]
    return start_process(cmd, port, 0, 180, {"PYTHONPATH": src})


if __name__ == "__main__":
    main()
