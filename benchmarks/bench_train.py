"""Training throughput of palmkit against transformers' CohereForCausalLM and the machine's matmul peak (issue 4).

A step is forward, backward, gradient clipping and the AdamW update, as `palmkit.train` runs it
(`forward_backward` + `optimizer_step`). transformers' step is the same with its own forward and
loss (`labels=`, no z-loss), the same weights (the export rename) and the same optimiser. Both run in
fp32 and in bf16 autocast, eager and under torch.compile. MFU is 6N + 12LdT FLOPs per token
(PaLM appendix B) times tokens/s over the best matmul FLOP/s measured in that dtype.

    python benchmarks/bench_train.py                     # small preset, batch 8 x 256: ~15 min on 2 cores
    python benchmarks/bench_train.py --dtypes bf16 --compile off --repeats 1 --steps 5

Steps are timed one by one after warm-up; a cell is the median step of a repeat, and the table gives
the median over repeats with their range, which shows how noisy a shared machine was.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from palmkit.export import hf_config, hf_state_dict
from palmkit.model import PaLM, build_model, preset
from palmkit.train import (
    Dist,
    TrainConfig,
    compute_autocast,
    forward_backward,
    keep_freed_memory,
    make_optimizer,
    measure_matmul_peak,
    optimizer_step,
    parallelize,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def transformers_twin(model: PaLM) -> torch.nn.Module:
    """CohereForCausalLM of the same shape holding the same weights."""
    import transformers

    hf = transformers.CohereForCausalLM(transformers.CohereConfig(**hf_config(model.config), use_cache=False))
    missing, unexpected = hf.load_state_dict(hf_state_dict(model.state_dict()), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is the tied embedding
        raise RuntimeError(f"weights do not map: missing {missing}, unexpected {unexpected}")
    return hf.train()


def palmkit_step(model, optimizer, cfg: TrainConfig) -> Callable:
    autocast = compute_autocast(cfg, torch.device("cpu"))

    def step(x, y):
        forward_backward(model, x, y, cfg, autocast)
        optimizer_step(model, optimizer, cfg)

    return step


def transformers_step(model, optimizer, cfg: TrainConfig) -> Callable:
    autocast = compute_autocast(cfg, torch.device("cpu"))

    def step(x, y):
        with autocast:
            # shift_labels: the targets are already shifted, as palmkit's are
            loss = model(input_ids=x, labels=y, shift_labels=y).loss
        loss.backward()
        optimizer_step(model, optimizer, cfg)

    return step


def median_step(step: Callable, batches: list, warmup: int, steps: int) -> float:
    """Median seconds of one step, after `warmup` untimed steps (compilation happens there)."""
    for i in range(warmup):
        step(*batches[i % len(batches)])
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(*batches[i % len(batches)])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fmt_range(values: list[float], spec: str) -> str:
    mid = statistics.median(values)
    if len(values) == 1:
        return format(mid, spec)
    return f"{format(mid, spec)} ({format(min(values), spec)}–{format(max(values), spec)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--impls", nargs="+", default=["palmkit", "transformers"], choices=["palmkit", "transformers"])
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per repeat (the first compiles)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per repeat")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over every configuration, interleaved")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's malloc as it is instead of palmkit's training setting")
    args = ap.parse_args()
    # Process-wide, so transformers runs under the same allocator: the ratio compares the code only.
    kept = not args.default_malloc and keep_freed_memory()

    torch.manual_seed(0)
    cfg = preset(args.preset, max_seq_len=args.seq_len)
    plain = build_model(cfg, seed=0).train()
    models = {"palmkit": plain}
    if "transformers" in args.impls:
        models["transformers"] = transformers_twin(plain)
    tokens = args.batch * args.seq_len
    data = torch.randint(0, cfg.vocab_size, (4, args.batch, args.seq_len + 1))
    batches = [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in data]
    make_step = {"palmkit": palmkit_step, "transformers": transformers_step}

    optimizers = {impl: make_optimizer(models[impl], TrainConfig()) for impl in args.impls}
    # palmkit compiles as its trainer does; transformers' model is compiled whole
    wrapped = {(impl, c): parallelize(plain, TrainConfig(compile=c == "on"), Dist()) if impl == "palmkit"
               else torch.compile(models[impl]) if c == "on" else models[impl]
               for impl in args.impls for c in args.compile}
    # Implementations alternate innermost, so that both see the same load on a shared machine.
    runs = {(dtype, c, impl): make_step[impl](wrapped[impl, c], optimizers[impl],
                                              TrainConfig(dtype=dtype, compile=c == "on"))
            for dtype in args.dtypes for c in args.compile for impl in args.impls}

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.preset} preset "
          f"({plain.num_params() / 1e6:.1f}M parameters), batch {args.batch} x {args.seq_len}, "
          f"freed memory kept: {kept}, load average before {os.getloadavg()[0]:.2f}", flush=True)
    peaks: dict[str, list[float]] = {d: [] for d in args.dtypes}
    seconds: dict[tuple, list[float]] = {key: [] for key in runs}
    for r in range(args.repeats):
        for dtype in args.dtypes:
            peaks[dtype].append(measure_matmul_peak(DTYPES[dtype], seconds=2.0))
        for key, step in runs.items():
            t = median_step(step, batches, args.warmup, args.steps)
            seconds[key].append(t)
            print(f"repeat {r + 1}/{args.repeats} {' '.join(key):28s} {tokens / t:8,.0f} tok/s", flush=True)

    flops = cfg.flops_per_token(args.seq_len)
    print(f"\nload average after {os.getloadavg()[0]:.2f}; matmul peak (best of {args.repeats}): "
          + ", ".join(f"{d} {max(p) / 1e9:.0f} GFLOP/s" for d, p in peaks.items())
          + f"; {flops / 1e6:.1f} MFLOP per token\n")
    head = "| dtype | compile |"
    rule = "|---|---|"
    for impl in args.impls:
        head += f" {impl} tok/s | {impl} MFU |"
        rule += "---:|---:|"
    if len(args.impls) == 2:
        head += " palmkit / transformers |"
        rule += "---:|"
    print(head + "\n" + rule)
    for dtype in args.dtypes:
        for compiled in args.compile:
            row = f"| {dtype} | {compiled} |"
            for impl in args.impls:
                tok_s = [tokens / t for t in seconds[dtype, compiled, impl]]
                mfu = [flops * v / max(peaks[dtype]) * 100 for v in tok_s]
                row += f" {fmt_range(tok_s, ',.0f')} | {fmt_range(mfu, '.0f')}% |"
            if len(args.impls) == 2:
                ratios = [b / a for a, b in zip(seconds[dtype, compiled, "palmkit"],
                                                seconds[dtype, compiled, "transformers"], strict=True)]
                row += f" {fmt_range(ratios, '.2f')}x |"
            print(row)


if __name__ == "__main__":
    main()
