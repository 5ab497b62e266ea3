"""Tensor-parallel decode on 2 processes (gloo on CPUs) against one process, side by side in one run.

Two ranks are spawned here. Each measurement alternates the candidates, best of `--repeats`:

- one process, 1 thread and 2 threads (rank 0 runs it while rank 1 waits in a barrier, which sleeps);
- TP=2, each rank 1 thread, the shared embedding replicated, then split by vocabulary (`--vocab_parallel`);
- the TP code path on a 1-rank mesh (1 thread): what torch's DTensor dispatch costs a decode step by itself.

Decode ms/token = (T(N) - T(1)) / (N - 1) of `generate_ids` (greedy, exactly N new tokens), as
benchmarks/bench_decode.py measures it, in wall-clock time and in rank 0's CPU time (for TP: one rank's share of
the work; it does not count the time other processes on a shared machine take, wall time does). The notes time
what TP adds per decode token on its own: one all-reduce of (batch, d_model) fp32 per block, and with the split
embedding one more for the lookup and an all-gather of the logits. Every candidate is checked to give the
one-process greedy tokens.

    python benchmarks/bench_tp.py                             # small preset, batch 1 and 8, 32 new tokens
    python benchmarks/bench_tp.py --preset base --batch 1 --repeats 5
    python benchmarks/bench_tp.py --plans     # RowwiseParallel on a 3-D input against MatrixRowwiseParallel

`--plans` times one row-parallel `Linear(d_ff, d_model)` of the preset on a 1-rank mesh, one token, under
inference mode: torch's RowwiseParallel given the (batch, time, features) input, then palmkit's
MatrixRowwiseParallel, which multiplies it as a 2-D matrix (their outputs are checked equal).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

from palmkit.infer.generate import generate_ids
from palmkit.infer.sampling import SamplingParams
from palmkit.infer.tensor_parallel import MatrixRowwiseParallel, TensorParallelPaLM, tensor_parallel
from palmkit.model.palm import build_model, preset
from palmkit.train.distributed import init_distributed


def run(model, prompts: list[list[int]], n: int) -> list:
    return list(generate_ids(model, prompts, SamplingParams(max_new_tokens=n, temperature=0, stop_at_eos=False)))


def alone(model, prompts: list[list[int]], threads: int):
    """A decode run of one process with `threads` threads."""
    def decode(n: int) -> list:
        torch.set_num_threads(threads)
        return run(model, prompts, n)
    return decode


def timed(fn, *args) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, out


def collective_ms(batch: int, d_model: int, vocab: int, mesh, steps: int = 200) -> tuple[float, float]:
    """(ms of one all-reduce of (batch, d_model) fp32, ms of the vocabulary all-gather of the logits)."""
    x = torch.randn(batch, d_model)
    local = torch.randn(batch, vocab // mesh.size())
    best = [float("inf"), float("inf")]
    for _ in range(3):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            dist.all_reduce(x)
        t1 = time.perf_counter()
        for _ in range(steps):
            DTensor.from_local(local, mesh, [Shard(-1)], run_check=False).redistribute(placements=[Replicate()])
        t2 = time.perf_counter()
        best = [min(best[0], (t1 - t0) * 1000 / steps), min(best[1], (t2 - t1) * 1000 / steps)]
    return best[0], best[1]


def plans(cfg, calls: int = 300) -> None:
    """CPU microseconds per call of a row-parallel linear, torch's style on a 3-D input against palmkit's."""
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    mesh = DeviceMesh("cpu", [0])
    torch.set_num_threads(1)
    x = torch.randn(1, 1, cfg.d_ff)
    weight = torch.randn(cfg.d_model, cfg.d_ff)
    times, outs = {}, {}
    for name, style in (("RowwiseParallel, 3-D input", RowwiseParallel(output_layouts=Partial())),
                        ("MatrixRowwiseParallel", MatrixRowwiseParallel(output_layouts=Partial()))):
        layer = torch.nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        layer.weight.data.copy_(weight)
        parallelize_module(layer, mesh, style, src_data_rank=None)
        with torch.inference_mode():
            for _ in range(20):
                outs[name] = layer(x)
            best = float("inf")
            for _ in range(3):
                t0 = time.process_time()
                for _ in range(calls):
                    layer(x)
                best = min(best, (time.process_time() - t0) / calls)
        times[name] = best * 1e6
        print(f"{name}: {times[name]:.0f} us per call (CPU time, best of 3 x {calls} calls)")
    a, b = times.values()
    print(f"ratio {a / b:.1f}x; outputs equal: {torch.equal(*outs.values())}")
    dist.destroy_process_group()


def rank_main(rank: int, port: int, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    d = init_distributed()
    cfg = preset(args.preset)
    single = build_model(cfg, seed=0).eval()
    split = {vp: tensor_parallel(build_model(cfg, seed=0).eval(), d, vocab_parallel=vp) for vp in (False, True)}
    solo = dist.new_group([0])  # every rank takes part in making a group, members or not
    one_rank = TensorParallelPaLM(build_model(cfg, seed=0).eval(), DeviceMesh.from_group(solo, "cpu")) if rank == 0 \
        else None
    g = torch.Generator().manual_seed(0)
    all_prompts = torch.randint(3, cfg.vocab_size, (max(args.batch), args.prompt_len), generator=g).tolist()
    n = args.new_tokens
    if rank == 0:
        print(f"model: {args.preset} preset, random init, {single.num_params() / 1e6:.1f}M parameters, "
              f"vocab {cfg.vocab_size}, fp32; torch {torch.__version__}, {os.cpu_count()} CPUs "
              f"({platform.processor() or platform.machine()})")
        print(f"prompt {args.prompt_len} tokens, {n} new tokens, greedy, best of {args.repeats}; "
              f"load average at the start {os.getloadavg()[0]:.1f}\n")
        print("| batch | candidate | decode ms/token | rank 0 CPU ms/token | decode tokens/s "
              "| vs 1 process, 2 threads |")
        print("| ---: | --- | ---: | ---: | ---: | ---: |")
    notes = []
    for b in args.batch:
        prompts = all_prompts[:b]

        candidates = {"1 process, 1 thread": alone(single, prompts, 1),
                      "1 process, 2 threads": alone(single, prompts, 2),
                      "TP=2, embedding replicated": lambda k, p=prompts: run(split[False], p, k),
                      "TP=2, embedding split by vocabulary": lambda k, p=prompts: run(split[True], p, k),
                      "TP code path on 1 rank, 1 thread": lambda k, p=prompts: run(one_rank, p, k)}
        best = {name: [float("inf")] * 4 for name in candidates}  # wall T(1), cpu T(1), wall T(N), cpu T(N)
        tokens = {}
        for _ in range(args.repeats + 1):  # the first round warms up (allocations, kernel choices) and is dropped
            for name, fn in candidates.items():
                dist.barrier()
                if name.startswith("TP="):
                    torch.set_num_threads(1)
                elif rank:  # one process: rank 1 waits for rank 0 in the next barrier (gloo's waits sleep)
                    continue
                elif name.startswith("TP code"):
                    torch.set_num_threads(1)
                w1, c1, _ = timed(fn, 1)
                wn, cn, tokens[name] = timed(fn, n)
                best[name] = [min(a, x) for a, x in zip(best[name], (w1, c1, wn, cn), strict=True)]
        reduce_ms, gather_ms = collective_ms(b, cfg.d_model, cfg.vocab_size, split[True].mesh)
        if rank:
            continue
        ms = {name: (wn - w1) * 1000 / (n - 1) for name, (w1, _, wn, _) in best.items()}
        cpu = {name: (cn - c1) * 1000 / (n - 1) for name, (_, c1, _, cn) in best.items()}
        for name, v in ms.items():
            print(f"| {b} | {name} | {v:.2f} | {cpu[name]:.2f} | {b * 1000 / v:.1f} | "
                  f"{ms['1 process, 2 threads'] / v:.2f}x |")
        per_token = reduce_ms * cfg.n_layers
        notes.append(f"batch {b}: all-reduce of ({b}, {cfg.d_model}) fp32 {reduce_ms * 1000:.0f} us, x {cfg.n_layers} "
                     f"blocks = {per_token:.2f} ms/token ({per_token / ms['TP=2, embedding replicated']:.0%} of the "
                     f"TP decode step); split embedding adds one more all-reduce and a logits all-gather "
                     f"({gather_ms * 1000:.0f} us)")
        same = all(tokens[name] == tokens["1 process, 1 thread"] for name in tokens)
        notes.append(f"batch {b}: greedy tokens of every candidate " + ("are the same" if same else "DIFFER"))
    if rank == 0:
        print()
        print("\n".join(notes))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the best is kept")
    ap.add_argument("--plans", action="store_true", help="only time the row-parallel sharding plans")
    args = ap.parse_args()
    if args.plans:
        plans(preset(args.preset))
        return
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (decode time is T(N) - T(1))")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, (port, args), nprocs=2)


if __name__ == "__main__":
    main()
