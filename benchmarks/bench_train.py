"""Training throughput of palmkit against transformers' CohereForCausalLM and the machine's matmul peak.

A step is forward, backward, gradient clipping and the AdamW update, as `palmkit pretrain` runs it
(`forward_backward` + `optimizer_step`). transformers' step is the same with its own forward and
loss (`labels=`, no z-loss), the same weights (the export rename) and the same optimiser. Both run in
fp32 and in bf16 autocast, eager and under torch.compile. MFU is 6N + 12LdT FLOPs per token
(PaLM appendix B) times tokens/s over the best matmul FLOP/s measured in that dtype.

    python benchmarks/bench_train.py                     # small preset, batch 8 x 256: ~15 min on 2 cores
    python benchmarks/bench_train.py --dtypes bfloat16 --compile off --repeats 1 --steps 5

Steps are timed one by one after warm-up; a cell is the median step of a repeat, and the table gives
the median over repeats with their range, which shows how noisy a shared machine was.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from palmkit.model.export import hf_config
from palmkit.model.layouts import hf_state_dict
from palmkit.model.palm import PaLM, build_model, preset
from palmkit.train.config import TrainConfig
from palmkit.train.distributed import Dist, parallelize
from palmkit.train.perf import keep_freed_memory, measure_matmul_peak
from palmkit.train.step import compute_autocast, forward_backward, make_optimizer, optimizer_step

# torch's names, as `palmkit pretrain --train.dtype` takes them; bf32 is float32 with bf16-rounded matmuls
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "bf32": torch.float32}


@contextlib.contextmanager
def matmul_precision(dtype: str):
    """bf32: fp32 everywhere, but matmuls round their inputs to bf16 (oneDNN's reduced-precision fp32 route)."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium" if dtype == "bf32" else saved)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def transformers_twin(model: PaLM) -> torch.nn.Module:
    """CohereForCausalLM of the same shape holding the same weights."""
    import transformers

    hf = transformers.CohereForCausalLM(transformers.CohereConfig(**hf_config(model.config), use_cache=False))
    missing, unexpected = hf.load_state_dict(hf_state_dict(model.state_dict()), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is the tied embedding
        raise RuntimeError(f"weights do not map: missing {missing}, unexpected {unexpected}")
    return hf.train()


def palmkit_step(model, optimizer, dtype: torch.dtype) -> Callable:
    autocast = compute_autocast(torch.device("cpu"), dtype)

    def step(x, y):
        forward_backward(model, x, y, autocast)
        optimizer_step(model, optimizer, grad_clip=1.0)

    return step


def transformers_step(model, optimizer, dtype: torch.dtype) -> Callable:
    autocast = compute_autocast(torch.device("cpu"), dtype)

    def step(x, y):
        with autocast:
            # shift_labels: the targets are already shifted, as palmkit's are
            loss = model(input_ids=x, labels=y, shift_labels=y).loss
        loss.backward()
        optimizer_step(model, optimizer, grad_clip=1.0)

    return step


def fp32_gemm_routes(seconds: float = 1.0) -> str:
    """GFLOP/s and error of an fp32 linear layer of the model's shape through each public torch route."""
    x, w = torch.randn(2048, 384, dtype=torch.float64), torch.randn(1536, 384, dtype=torch.float64)
    exact = x @ w.T
    x, w = x.float(), w.float()

    def best(f) -> float:
        f()
        t, deadline = math.inf, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            f()
            t = min(t, time.perf_counter() - t0)
        return 2 * x.shape[0] * x.shape[1] * w.shape[0] / t / 1e9

    def error(y) -> str:
        return f"{((y.double() - exact).norm() / exact.norm()).item():.1e}"

    rows = []
    matmul = torch.backends.mkldnn.matmul
    saved = torch.get_float32_matmul_precision(), matmul.fp32_precision
    settings = [("ieee", False), ("tf32", False), ("bf16", False), ("high", True), ("medium", True)]
    for setting, global_api in settings:
        if global_api:
            torch.set_float32_matmul_precision(setting)
            name = f"`torch.set_float32_matmul_precision('{setting}')`"
        else:
            matmul.fp32_precision = setting
            name = f"`torch.backends.mkldnn.matmul.fp32_precision = '{setting}'`"
        rows.append((name, best(lambda: F.linear(x, w)), error(F.linear(x, w))))
        torch.set_float32_matmul_precision(saved[0])
        matmul.fp32_precision = saved[1]
    # oneDNN's own fp32 kernel, which inductor uses for frozen (inference-only) linear layers
    rows.append(("oneDNN fp32 (`torch.ops.mkldnn._linear_pointwise`)",
                 best(lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")),
                 error(torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""))))
    rows.append(("default (MKL sgemm)", best(lambda: F.linear(x, w)), error(F.linear(x, w))))
    lines = ["| fp32 linear 2048x384 @ 384x1536 through | GFLOP/s | relative error |", "|---|---:|---:|"]
    return "\n".join(lines + [f"| {name} | {g:.0f} | {e} |" for name, g, e in rows])


def time_steps(step: Callable, batches: list, warmup: int, steps: int) -> tuple[float, float]:
    """Median wall-clock and CPU seconds of one step, after `warmup` untimed steps (which compile)."""
    for i in range(warmup):
        step(*batches[i % len(batches)])
    wall, cpu = [], []
    for i in range(steps):
        w0, c0 = time.perf_counter(), time.process_time()
        step(*batches[i % len(batches)])
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def cell(values: list[float], spec: str) -> str:
    """The best value, and the range over repeats when there are several."""
    best = format(max(values), spec)
    return best if len(values) == 1 else f"{best} ({format(min(values), spec)}–{format(max(values), spec)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES),
                    help="bfloat16: autocast; bf32: float32 with set_float32_matmul_precision('medium')")
    ap.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--impls", nargs="+", default=["palmkit", "transformers"], choices=["palmkit", "transformers"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default (one per core)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per repeat (the first ones compile)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per repeat")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over every configuration, interleaved")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's malloc as it is instead of palmkit's training setting")
    ap.add_argument("--fuse-projections", action="store_true",
                    help="palmkit with q/k/v/gate/up as one GEMM (pretrain --fuse-projections)")
    ap.add_argument("--gemm-routes", action="store_true", help="also time fp32 linear layers through each route")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # Process-wide, so transformers runs under the same allocator: the ratio compares the code only.
    kept = not args.default_malloc and keep_freed_memory()

    if args.gemm_routes:
        print(fp32_gemm_routes() + "\n", flush=True)
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
    # palmkit compiles as its trainer does; transformers' model is compiled whole
    wrapped = {(impl, c): parallelize(plain, TrainConfig(compile=c == "on", fuse_projections=args.fuse_projections),
                                      Dist()) if impl == "palmkit"
               else torch.compile(models[impl]) if c == "on" else models[impl]
               for impl in args.impls for c in args.compile}
    # pretraining's default AdamW (lr 2e-3, weight decay 0.1), made after any fusing
    optimizers = {impl: make_optimizer(models[impl], lr=2e-3, weight_decay=0.1) for impl in args.impls}
    # Implementations alternate innermost, so that both see the same load on a shared machine.
    runs = {(dtype, c, impl): make_step[impl](wrapped[impl, c], optimizers[impl], DTYPES[dtype])
            for dtype in args.dtypes for c in args.compile for impl in args.impls}

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.preset} preset "
          f"({plain.num_params() / 1e6:.1f}M parameters), batch {args.batch} x {args.seq_len}, "
          f"freed memory kept: {kept}, load average before {os.getloadavg()[0]:.2f}", flush=True)
    peaks: dict[str, list[float]] = {d: [] for d in args.dtypes}
    wall: dict[tuple, list[float]] = {key: [] for key in runs}
    cpu: dict[tuple, list[float]] = {key: [] for key in runs}
    for r in range(args.repeats):
        for dtype in args.dtypes:
            with matmul_precision(dtype):
                peaks[dtype].append(measure_matmul_peak(DTYPES[dtype], seconds=2.0))
        for key, step in runs.items():
            with matmul_precision(key[0]):
                w, c = time_steps(step, batches, args.warmup, args.steps)
            wall[key].append(w)
            cpu[key].append(c)
            print(f"repeat {r + 1}/{args.repeats} {' '.join(key):28s} {tokens / w:8,.0f} tok/s "
                  f"{tokens / c:8,.0f} tok per CPU-s", flush=True)

    flops = cfg.flops_per_token(args.seq_len)
    peak = {d: max(p) for d, p in peaks.items()}
    print(f"\nload average after {os.getloadavg()[0]:.2f}; matmul peak (best of {args.repeats}): "
          + ", ".join(f"{d} {p / 1e9:.0f} GFLOP/s" for d, p in peak.items())
          + f"; {flops / 1e6:.1f} MFLOP per token. Cells: best repeat (range over repeats); ratios: median of "
          "the repeats' back-to-back pairs (range).\n")
    both = len(args.impls) == 2
    head, rule = "| dtype | compile |", "|---|---|"
    for impl in args.impls:
        head, rule = head + f" {impl} tok/s | {impl} MFU |", rule + "---:|---:|"
    if both:
        head += " palmkit / transformers, wall | palmkit / transformers, CPU time |"
        rule += "---:|---:|"
    print(head + "\n" + rule)
    for dtype in args.dtypes:
        for c in args.compile:
            row = f"| {dtype} | {c} |"
            for impl in args.impls:
                tok_s = [tokens / t for t in wall[dtype, c, impl]]
                row += f" {cell(tok_s, ',.0f')} | {cell([flops * v / peak[dtype] * 100 for v in tok_s], '.0f')}% |"
            if both:
                for times in (wall, cpu):
                    p, h = times[dtype, c, "palmkit"], times[dtype, c, "transformers"]
                    # each repeat's pair ran back to back under the same load: the median of their ratios,
                    # and their range, say more on a noisy machine than best against best
                    ratios = [b / a for a, b in zip(p, h, strict=True)]
                    row += f" {statistics.median(ratios):.2f}x"
                    if len(p) > 1:
                        row += f" ({min(ratios):.2f}–{max(ratios):.2f})"
                    row += " |"
            print(row)


if __name__ == "__main__":
    main()
