"""Load and abuse: 32 well-behaved clients beside oversized, malformed, slow and header-flooding ones.

`palmkit serve` runs a random `tiny` model in its own process on loopback, once per candidate source tree
(`--candidates NAME=SRC_DIR ...`, each put first on PYTHONPATH), one candidate after the other with the same load,
so that the code before a change and after it are measured side by side in one run:

- `--clients` (32) closed-loop clients send well-formed completions and chats (greedy, 16 tokens) and time them;
- an oversized client posts a 2 MiB body of one-character prompts (the shape that froze the server before it
  refused bodies by size) every 2 s;
- a malformed client sends broken JSON, wrong types, a text/plain body and an unknown route, one every 0.25 s;
- a slow client keeps 50 connections that send one header byte a second ("slowloris") and reopens those the
  server drops;
- a header client sends a 4 MiB header block every 5 s;
- 2 slow readers each ask for a stream of 32 choices of a whole context with `logprobs: 10` (about 5 MB,
  more than the kernel's socket buffers hold, under the server's cap on log-probabilities) and never read a
  byte of it (a small receive window), holding each connection 45 s before opening another;
- an echo bomb posts `echo` + `logprobs: 20` over as many whole-context prompts as the server takes (the
  response is megabytes of JSON) every 5 s and reads it; another asks for more than the server's cap every 5 s;
- a prober process GETs /health every 50 ms: its longest answer time is the longest stall of the event loop.

Each candidate runs twice, `quiet` (the well-formed clients alone) and `abused` (with every abuser), unless
`--modes` says otherwise: the well-formed requests served under abuse are compared with those served alone.

Reported per candidate and mode: well-formed requests served (200) and their p50/p99 latency, the longest
/health stall, the server's peak and start/end RSS (VmHWM/VmRSS of /proc), every 5xx answer, the slow
connections and slow readers the server dropped.

    python benchmarks/bench_abuse.py --seconds 300 --candidates before=/tmp/palmkit-head/src after=src
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_checkpoint(src: str, root: Path) -> Path:
    """A random tiny model saved by the candidate's own code (so that it reads its own format)."""
    code = ("import sys; from pathlib import Path; sys.path.insert(0, 'benchmarks');"
            "from bench_decode import make_checkpoint; print(make_checkpoint(Path(sys.argv[1]), 'tiny'))")
    env = {**os.environ, "PYTHONPATH": src}
    subprocess.run([sys.executable, "-c", code, str(root)], check=True, env=env, capture_output=True)
    return root / "ckpt"


def start_server(src: str, checkpoint: Path, timeout: float = 180) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "palmkit.cli", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
           "--model_name", "bench", "--server.log_level", "critical"]
    from bench_serve import start_process  # imported here: bench_serve imports this tree's palmkit (and torch)

    return start_process(cmd, port, 0, timeout, {"PYTHONPATH": src})


def rss_kib(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0])
    return fields


class Run:
    """What one candidate's run saw."""

    def __init__(self) -> None:
        self.latency: list[float] = []
        self.statuses: Counter = Counter()  # (client kind, status)
        self.health: list[float] = []
        self.dropped_slow = 0
        self.dropped_readers = 0
        self.rss: list[int] = []
        self.health_worst_at: float | None = None

    def status(self, kind: str, code: int | str) -> None:
        self.statuses[kind, code] += 1


JSON = {"Content-Type": "application/json"}


async def well_formed(client: httpx.AsyncClient, run: Run, stop: float, k: int) -> None:
    completion = {"model": "bench", "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}
    chat = {"model": "bench", "messages": [{"role": "user", "content": "Hello, who are you?"}], "max_tokens": 16,
            "temperature": 0}
    i = 0
    while time.monotonic() < stop:
        path, body = ("/v1/completions", completion) if (i + k) % 2 else ("/v1/chat/completions", chat)
        i += 1
        t0 = time.perf_counter()
        try:
            r = await client.post(path, json=body, timeout=120)
        except httpx.HTTPError as exc:
            run.status("well-formed", type(exc).__name__)
            await asyncio.sleep(0.1)
            continue
        run.status("well-formed", r.status_code)
        if r.status_code == 200:
            run.latency.append(time.perf_counter() - t0)
        else:
            await asyncio.sleep(0.1)  # 429: back off a little, as a client should


async def oversized(client: httpx.AsyncClient, run: Run, stop: float) -> None:
    body = json.dumps({"model": "bench", "prompt": ["a"] * ((2 << 20) // 5), "max_tokens": 1}).encode()
    while time.monotonic() < stop:
        try:
            r = await client.post("/v1/completions", content=body, headers=JSON, timeout=120)
            run.status("oversized", r.status_code)
        except httpx.HTTPError as exc:
            run.status("oversized", type(exc).__name__)
        await asyncio.sleep(2)


async def malformed(client: httpx.AsyncClient, run: Run, stop: float) -> None:
    cases = [("/v1/completions", b"{not json", JSON), ("/v1/completions", b'{"model": "bench", "prompt": 5}', JSON),
             ("/v1/chat/completions", b'{"model": "bench", "messages": "hi"}', JSON),
             ("/v1/completions", b'{"model": "bench", "prompt": "x"}', {"Content-Type": "text/plain"}),
             ("/v1/nothing", b"{}", JSON), ("/v1/completions", b'{"model": "bench", "prompt": "x", "n": 1000}', JSON)]
    i = 0
    while time.monotonic() < stop:
        path, body, headers = cases[i % len(cases)]
        i += 1
        try:
            r = await client.post(path, content=body, headers=headers, timeout=60)
            run.status("malformed", r.status_code)
        except httpx.HTTPError as exc:
            run.status("malformed", type(exc).__name__)
        await asyncio.sleep(0.25)


async def slow_connection(host: str, port: int, run: Run, stop: float) -> None:
    while time.monotonic() < stop:
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            while time.monotonic() < stop:
                await asyncio.sleep(1)
                writer.write(b"a")
                await writer.drain()
                if reader.at_eof():
                    break
            writer.close()
        except OSError:
            pass
        if time.monotonic() < stop:
            run.dropped_slow += 1


async def big_header(host: str, port: int, run: Run, stop: float) -> None:
    while time.monotonic() < stop:
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
            for _ in range(64):
                writer.write(b"a" * 65536)
                await writer.drain()
            writer.write(b"\r\n\r\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 30)
            run.status("big header", int(line.split()[1]) if line else "closed")
            writer.close()
        except (OSError, TimeoutError, IndexError, ValueError) as exc:
            run.status("big header", type(exc).__name__)
        await asyncio.sleep(5)


async def slow_reader(host: str, port: int, run: Run, stop: float, context: int, hold: float = 45) -> None:
    """Ask for a long stream with logprobs and read none of it, `hold` seconds a connection."""
    rng = random.Random(port)
    prompt = [rng.randrange(3, 399) for _ in range(8)]
    body = json.dumps({"model": "bench", "prompt": prompt, "n": 32, "max_tokens": context - 9, "logprobs": 10,
                       "stream": True, "ignore_eos": True}).encode()
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    loop = asyncio.get_running_loop()
    while time.monotonic() < stop:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (host, port))
            await loop.sock_sendall(sock, request)
            await asyncio.sleep(max(0.0, min(hold, stop - time.monotonic())))
            answer = sock.recv(12)  # the first bytes a reader would have seen: the status line
            run.status("slow reader", int(answer.split()[1]) if len(answer.split()) > 1 else "closed")
            sock.send(b"\r\n")  # fails once the server has reset the connection
        except OSError:
            run.dropped_readers += 1
        finally:
            sock.close()


async def echo_bomb(client: httpx.AsyncClient, run: Run, stop: float, context: int, choices: int) -> None:
    """Every 5 s: echo + logprobs 20 over `choices` whole-context prompts (read in full), then one past the cap."""
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 399) for _ in range(context - 1)] for _ in range(choices)]
    bomb = {"model": "bench", "prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 20}
    past = {**bomb, "prompt": prompts * 4, "max_tokens": 0}
    i = 0
    while time.monotonic() < stop:
        kind, body = ("echo bomb", bomb) if i % 2 == 0 else ("echo past cap", past)
        i += 1
        try:
            r = await client.post("/v1/completions", json=body, timeout=120)
            run.status(kind, r.status_code)
        except httpx.HTTPError as exc:
            run.status(kind, type(exc).__name__)
        await asyncio.sleep(5)


def prober(base: str, seconds: float, out: multiprocessing.Queue) -> None:
    """GET /health every 50 ms from a process of its own (the load's event loop would delay its own probes);
    puts [(seconds since start, answer time, status)]."""
    rows, start = [], time.monotonic()
    with httpx.Client(base_url=base) as client:
        while time.monotonic() - start < seconds:
            t0 = time.perf_counter()
            try:
                status = client.get("/health", timeout=60).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            rows.append((time.monotonic() - start, time.perf_counter() - t0, status))
            time.sleep(0.05)
    out.put(rows)


async def memory(pid: int, run: Run, stop: float) -> None:
    while time.monotonic() < stop:
        run.rss.append(rss_kib(pid)["VmRSS"])
        await asyncio.sleep(0.5)


ABUSERS = ("oversized", "malformed", "header", "slowloris", "readers", "bombs")


async def load(base: str, pid: int, seconds: float, clients: int, abusers: tuple[str, ...] = ABUSERS) -> Run:
    run = Run()
    host, port = base.removeprefix("http://").split(":")
    card = httpx.get(f"{base}/v1/models").json()["data"][0]
    context = card.get("max_model_len", 256)
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(base_url=base, limits=limits) as client, httpx.AsyncClient(base_url=base) as other:
        tasks = [well_formed(client, run, stop, k) for k in range(clients)]
        chosen = {"oversized": lambda: [oversized(other, run, stop)],
                  "malformed": lambda: [malformed(other, run, stop)],
                  "header": lambda: [big_header(host, int(port), run, stop)],
                  "slowloris": lambda: [slow_connection(host, int(port), run, stop) for _ in range(50)],
                  "readers": lambda: [slow_reader(host, int(port), run, stop, context) for _ in range(2)],
                  "bombs": lambda: [echo_bomb(other, run, stop, context, 16)]}
        for name in abusers:
            tasks += chosen[name]()
        tasks += [memory(pid, run, stop)]
        probes: multiprocessing.Queue = multiprocessing.Queue()
        health = multiprocessing.Process(target=prober, args=(base, seconds, probes))
        health.start()
        await asyncio.gather(*tasks)
        rows = await asyncio.to_thread(probes.get, True, 120)
        health.join(30)
    for _, seconds_taken, status in rows:
        run.health.append(seconds_taken)
        run.status("health", status)
    run.health_worst_at = max(rows, key=lambda r: r[1])[0] if rows else None
    return run


def summary(run: Run, peak_kib: int) -> dict:
    lat = sorted(run.latency)
    fives = {f"{kind} {code}": n for (kind, code), n in run.statuses.items() if isinstance(code, int) and code >= 500}
    errors = {f"{kind} {code}": n for (kind, code), n in run.statuses.items() if not isinstance(code, int)}
    return {
        "served": len(lat),
        "p50_s": statistics.median(lat) if lat else None,
        "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
        "health_max_s": max(run.health, default=None),
        "health_p99_s": sorted(run.health)[int(0.99 * len(run.health))] if run.health else None,
        "health_worst_at_s": run.health_worst_at,
        "health_n": len(run.health),
        "rss_start_mib": run.rss[0] / 1024 if run.rss else None,
        "rss_end_mib": run.rss[-1] / 1024 if run.rss else None,
        # after a third of the run: the batch sizes and buffers a load needs have been allocated once
        "rss_warm_mib": run.rss[len(run.rss) // 3] / 1024 if run.rss else None,
        "rss_peak_mib": peak_kib / 1024,
        "5xx": sum(fives.values()), "5xx_by_kind": fives, "client_errors": errors,
        "slow_dropped": run.dropped_slow,
        "readers_dropped": run.dropped_readers,
        "statuses": {f"{kind} {code}": n for (kind, code), n in sorted(run.statuses.items(), key=str)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", nargs="+", default=["after=src"], help="NAME=SRC_DIR (palmkit's src folder)")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--modes", nargs="+", default=["quiet", "abused"], choices=["quiet", "abused"],
                        help="quiet: the well-formed clients alone; abused: with the abusers")
    parser.add_argument("--abusers", nargs="+", default=list(ABUSERS), choices=ABUSERS,
                        help="the abusers of the abused mode (default: all)")
    args = parser.parse_args()
    results = {}
    for candidate in args.candidates:
        name, _, src = candidate.partition("=")
        src = str(Path(src).resolve())
        for mode in args.modes:
            with tempfile.TemporaryDirectory() as tmp:  # a fresh server per mode: RSS from the same start
                checkpoint = make_checkpoint(src, Path(tmp))
                proc, base = start_server(src, checkpoint)
                try:
                    abusers = tuple(args.abusers) if mode == "abused" else ()
                    run = asyncio.run(load(base, proc.pid, args.seconds, args.clients, abusers))
                    peak = rss_kib(proc.pid)["VmHWM"]
                finally:
                    proc.terminate()
                    proc.wait(30)
            label = f"{name} {mode}" if len(args.modes) > 1 else name
            results[label] = summary(run, peak)
            print(f"{label}: {json.dumps(results[label])}", flush=True)
    rows = [("well-formed served", "served", "{:.0f}"), ("p50 latency (s)", "p50_s", "{:.3f}"),
            ("p99 latency (s)", "p99_s", "{:.3f}"), ("longest /health (s)", "health_max_s", "{:.3f}"),
            ("p99 /health (s)", "health_p99_s", "{:.3f}"),
            ("RSS start (MiB)", "rss_start_mib", "{:.0f}"), ("RSS at a third (MiB)", "rss_warm_mib", "{:.0f}"),
            ("RSS end (MiB)", "rss_end_mib", "{:.0f}"),
            ("peak RSS (MiB)", "rss_peak_mib", "{:.0f}"), ("5xx answers", "5xx", "{:.0f}"),
            ("slow connections dropped", "slow_dropped", "{:.0f}"),
            ("slow readers dropped", "readers_dropped", "{:.0f}")]
    names = list(results)
    print(f"\n{args.seconds:g} s, {args.clients} well-formed clients + abusers; python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs")
    print("| measure | " + " | ".join(names) + (f" | {names[-1]} / {names[0]} |" if len(names) > 1 else " |"))
    print("|---" * (len(names) + 1 + (len(names) > 1)) + "|")
    for label, key, fmt in rows:
        values = [results[n][key] for n in names]
        cells = [fmt.format(v) if v is not None else "-" for v in values]
        ratio = ""
        if len(names) > 1:
            ratio = f" | {values[-1] / values[0]:.2f}" if values[0] and values[-1] is not None else " | -"
        print(f"| {label} | " + " | ".join(cells) + ratio + " |")


if __name__ == "__main__":
    main()
