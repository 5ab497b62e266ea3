"""Decode speed of palmkit against transformers `generate()` on the same exported weights.

Both libraries load the same files: a palmkit checkpoint (a random `--preset` model, or `--checkpoint DIR`) and
its `palmkit export` folder read by `transformers.AutoModelForCausalLM`. Both get the same token ids (random ids of
the model's vocabulary, so no tokenizer time is counted on either side), decode greedily, and produce exactly
`--new-tokens` tokens (palmkit: stop_at_eos=False; transformers: min_new_tokens = max_new_tokens).

Timing: a run with 1 new token measures prefill (plus the first token); a run with N new tokens adds N-1 decode
steps, so decode ms/token = (T(N) - T(1)) / (N - 1), measured the same way for both, in wall-clock time and in
this process's CPU time (steadier when other work shares the machine). Runs of the two libraries alternate, and
each figure is the best of `--repeats`: load from elsewhere only ever adds time. The "matmul floor" row times the
model's matrix products alone (every weight once, as a decode step multiplies them): what an implementation with
no other cost would take with the same kernels.

    python benchmarks/bench_decode.py --threads 1              # small preset, batch 1 and 8, 64 + 128 tokens
    python benchmarks/bench_decode.py --checkpoint runs/ckpt --batch 1 --repeats 5

With `--peer llama.cpp` the other side is llama.cpp's `llama-bench` (palmkit.model.llamacpp's cached build) on the
checkpoint's own GGUF export (palmkit.model.gguf_export), in f32 and in bf16: its `tg` test decodes `--new-tokens`
tokens at batch 1 after a context of `--prompt-len` tokens (`-d`), with `--threads` threads; palmkit decodes the same
in float32 and in bfloat16, and each is set beside the matmul floor of its dtype:

    python benchmarks/bench_decode.py --preset base --peer llama.cpp --threads 1 --prompt-len 128 --new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from palmkit.infer.engine import EngineOptions, runtime_layout
from palmkit.infer.generate import generate_ids
from palmkit.infer.sampling import SamplingParams
from palmkit.model.checkpoint import load_checkpoint, save_checkpoint
from palmkit.model.export import export_hf
from palmkit.model.palm import build_model, preset
from palmkit.model.tokenizer import train_tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"


def make_checkpoint(root: Path, preset_name: str) -> Path:
    """A randomly initialised model saved as a checkpoint.

    The checkpoint format needs a tokenizer file; a tiny one trained on the README fills that slot. It is never
    used: prompts are token ids, and the model keeps the preset's vocabulary so the output layer has its real cost.
    """
    tok = train_tokenizer(README.read_text(encoding="utf-8").splitlines(), root / "tokenizer.model", vocab_size=400)
    return save_checkpoint(root / "ckpt", build_model(preset(preset_name), seed=0).eval(), tok)


def palmkit_run(model, prompts: torch.Tensor, n: int) -> torch.Tensor:
    params = SamplingParams(max_new_tokens=n, temperature=0, stop_at_eos=False)
    return torch.tensor(list(generate_ids(model, prompts.tolist(), params))).T


def hf_run(hf, prompts: torch.Tensor, n: int) -> torch.Tensor:
    with torch.inference_mode():
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=hf.config.pad_token_id)
    return out[:, prompts.shape[1]:]


def matmul_floor(model, batch: int, steps: int) -> None:
    """`steps` decode steps' matrix products and nothing else: each weight times (batch, in_features) once a step."""
    weights = [w for w in model.parameters() if w.dim() == 2]
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=w.dtype) for w in weights}
    with torch.inference_mode():
        for _ in range(steps):
            for w in weights:
                F.linear(inputs[w.shape[1]], w)


def timed(fn, *args) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, out


def llama_bench(gguf_file: Path, prompt_len: int, new_tokens: int, threads: int, repeats: int) -> tuple[float, float]:
    """(mean, standard deviation) of llama-bench's decode tokens/s at batch 1 after a `prompt_len`-token context."""
    from palmkit.model.llamacpp import llama_cpp_bin

    cmd = [str(llama_cpp_bin() / "llama-bench"), "-m", str(gguf_file), "-p", "0", "-n", str(new_tokens),
           "-d", str(prompt_len), "-t", str(threads or os.cpu_count()), "-r", str(repeats), "-o", "json"]
    run = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return run[0]["avg_ts"], run[0]["stddev_ts"]


def compare_llama_cpp(args, ckpt: Path, tmp: Path) -> None:
    """palmkit (float32, bfloat16) beside llama-bench on the GGUF export (f32, bf16) and each dtype's matmul floor."""
    from palmkit.model.gguf_export import export_gguf

    rows, speed = [], {}
    g = torch.Generator().manual_seed(0)
    for dtype, outtype in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        # the weight layout `palmkit serve` runs with (column-major in float32 on a CPU)
        model = runtime_layout(load_checkpoint(ckpt, dtype=dtype)[0], EngineOptions())
        prompts = torch.randint(3, model.config.vocab_size, (1, args.prompt_len), generator=g)
        palmkit_run(model, prompts, 4)  # warm-up
        best = [float("inf")] * 4
        for _ in range(args.repeats):
            w1, c1, _ = timed(palmkit_run, model, prompts, 1)
            wn, cn, _ = timed(palmkit_run, model, prompts, args.new_tokens)
            best = [min(a, x) for a, x in zip(best, (w1, c1, wn, cn), strict=True)]
        ms = (best[2] - best[0]) * 1000 / (args.new_tokens - 1)
        cpu_ms = (best[3] - best[1]) * 1000 / (args.new_tokens - 1)
        floor = min(timed(matmul_floor, model, 1, args.new_tokens - 1)[0] for _ in range(args.repeats))
        floor_ms = floor * 1000 / (args.new_tokens - 1)
        gguf_file = export_gguf(ckpt, tmp / f"model-{outtype}.gguf", outtype)
        ts, sd = llama_bench(gguf_file, args.prompt_len, args.new_tokens, args.threads, args.repeats)
        speed[outtype] = (1000 / ms, ts)
        rows += [f"| palmkit | {outtype} | {ms:.2f} | {cpu_ms:.2f} | {1000 / ms:.1f} | {floor_ms / ms:.2f} |",
                 f"| llama.cpp | {outtype} | {1000 / ts:.2f} | | {ts:.1f} ± {sd:.1f} | {floor_ms * ts / 1000:.2f} |",
                 f"| matmul floor | {outtype} | {floor_ms:.2f} | | {1000 / floor_ms:.1f} | 1.00 |"]
        del model
    print(f"batch 1, context {args.prompt_len} tokens, {args.new_tokens} decoded tokens, greedy, "
          f"{args.threads or os.cpu_count()} threads, best of {args.repeats} (llama-bench: mean ± sd)\n")
    print("| runtime | weights | decode ms/token | CPU ms/token | tokens/s | floor time / its time |")
    print("|---|---|---:|---:|---:|---:|")
    print("\n".join(rows))
    print()
    for outtype, (mine, theirs) in speed.items():
        print(f"{outtype}: palmkit / llama.cpp decode tokens/s = {mine / theirs:.2f}x")
    print(f"palmkit bf16 / f32 decode tokens/s = {speed['bf16'][0] / speed['f32'][0]:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="palmkit checkpoint folder (default: a random --preset model)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the best is kept")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--peer", choices=["transformers", "llama.cpp"], default="transformers",
                    help="llama.cpp: llama-bench on the GGUF export, batch 1, f32 and bf16")
    args = ap.parse_args()
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (decode time is T(N) - T(1))")
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.peer == "llama.cpp":
        with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
            ckpt = Path(args.checkpoint) if args.checkpoint else make_checkpoint(Path(tmp), args.preset)
            print(f"model: {args.checkpoint or args.preset + ' preset, random init'}; torch {torch.__version__}, "
                  f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})")
            return compare_llama_cpp(args, ckpt, Path(tmp))

    import transformers

    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else make_checkpoint(Path(tmp), args.preset)
        hf_dir = export_hf(ckpt, Path(tmp) / "hf")
        model, _, _ = load_checkpoint(ckpt)
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    cfg = model.config
    if args.prompt_len + args.new_tokens > cfg.max_seq_len:
        ap.error(f"prompt + new tokens exceed the context of {cfg.max_seq_len}")
    # Random ids above the special ones: the same prompts for both libraries.
    g = torch.Generator().manual_seed(0)
    all_prompts = torch.randint(3, cfg.vocab_size, (max(args.batch), args.prompt_len), generator=g)

    print(f"model: {args.checkpoint or args.preset + ' preset, random init'}, {model.num_params() / 1e6:.1f}M "
          f"parameters, vocab {cfg.vocab_size}, fp32")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})")
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, best of {args.repeats}\n")

    runners = {"palmkit": lambda p, n: palmkit_run(model, p, n), "transformers": lambda p, n: hf_run(hf, p, n)}
    rows, notes = [], []
    for b in args.batch:
        prompts = all_prompts[:b]
        for fn in runners.values():  # warm-up: first-call allocations and kernel choices
            fn(prompts, 4)
        best = {name: [float("inf")] * 4 for name in runners}  # wall T(1), cpu T(1), wall T(N), cpu T(N)
        tokens = {}
        for _ in range(args.repeats):  # alternate the libraries so that load from elsewhere hits both alike
            for name, fn in runners.items():
                w1, c1, _ = timed(fn, prompts, 1)
                wn, cn, tokens[name] = timed(fn, prompts, args.new_tokens)
                best[name] = [min(a, x) for a, x in zip(best[name], (w1, c1, wn, cn), strict=True)]
        speed, cpu = {}, {}
        for name, (w1, c1, wn, cn) in best.items():
            ms, cpu_ms = ((wn - w1) * 1000 / (args.new_tokens - 1), (cn - c1) * 1000 / (args.new_tokens - 1))
            speed[name], cpu[name] = b * 1000 / ms, cpu_ms
            rows.append(f"| {b} | {name} | {w1 * 1000:.1f} | {ms:.2f} | {cpu_ms:.2f} | {speed[name]:.1f} | "
                        f"{b * args.new_tokens / wn:.1f} |")
        # As many steps as a decode run, so that its best is comparable with the decode figures.
        floor = [min(t) * 1000 / (args.new_tokens - 1) for t in zip(
            *(timed(matmul_floor, model, b, args.new_tokens - 1)[:2] for _ in range(args.repeats)), strict=True)]
        rows.append(f"| {b} | matmul floor | | {floor[0]:.2f} | {floor[1]:.2f} | {b * 1000 / floor[0]:.1f} | |")
        notes.append(f"batch {b}: palmkit / transformers decode tokens/s = "
                     f"{speed['palmkit'] / speed['transformers']:.2f}x (wall clock), "
                     f"{cpu['transformers'] / cpu['palmkit']:.2f}x (CPU time)")
        same = torch.equal(tokens["palmkit"], tokens["transformers"])
        rows_same = int((tokens["palmkit"] == tokens["transformers"]).all(1).sum())
        notes.append(f"batch {b}: palmkit and transformers greedy tokens "
                     + ("are the same" if same else f"DIFFER ({rows_same} of {b} rows the same)"))

    print("| batch | library | prefill ms | decode ms/token | decode CPU ms/token | decode tokens/s "
          "| end-to-end tokens/s |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))
    print()
    print("\n".join(notes))


if __name__ == "__main__":
    main()
