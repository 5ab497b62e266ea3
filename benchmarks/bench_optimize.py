"""Every faster or smaller way to run the model's matrix products side by side: speed, size and perplexity.

The options are those of palmkit.model (fused projections, oneDNN-packed weights, int8 weights, low-rank layers),
plus bf16 and, when the `bench` extra is installed, torchao's int8 for comparison.

For each option: decode tokens/s at batch 1 and 8 (`generate_ids`, greedy, KV cache), prefill tokens/s, training
tokens/s where the option trains (fp32 weights with bf16 autocast, as `palmkit pretrain` runs), checkpoint size,
the logits' relative error against fp32, and held-out perplexity per language. Quantised and factorised options
are written by `palmkit quantize` / `palmkit compress` and read back by `load_checkpoint` before they are
measured, so the numbers are those of the files. Speeds are medians over `--repeats` rounds, the options
interleaved within each round so that all of them see the same load on a shared machine.

    python benchmarks/bench_optimize.py                      # builds a tiny corpus and model, so it always runs
    python benchmarks/bench_optimize.py --checkpoint runs/small/final --data CORPUS --heal-steps 40

Writes OUT/bench_optimize.md (the table) and OUT/bench_optimize.png (decode speed against perplexity).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from matplotlib.figure import Figure

from palmkit.apps.commands import compress_command, file_size, quantize_command
from palmkit.infer.generate import generate_ids
from palmkit.infer.sampling import SamplingParams
from palmkit.model.checkpoint import load_checkpoint, save_checkpoint
from palmkit.model.fused import fuse_projections
from palmkit.model.packed import pack_for_cpu
from palmkit.model.palm import PaLM
from palmkit.model.quant import Int8Linear
from palmkit.train.config import TrainConfig
from palmkit.train.distributed import Dist
from palmkit.train.lm_eval import evaluate_lm
from palmkit.train.pretrain import pretrain
from palmkit.train.step import compute_autocast, forward_backward, make_optimizer, optimizer_step

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Option:
    """One way of running the model: how to get it for inference and, if it trains, for training."""

    name: str
    model: PaLM
    size: int | None = None  # bytes of model.safetensors
    trainable: Callable[[], PaLM] | None = None
    speed: dict[str, list[float]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def tiny_setup(root: Path) -> tuple[Path, Path]:
    """A miniature corpus and a briefly pretrained tiny model, for runs without --checkpoint/--data."""
    sys.path.insert(0, str(ROOT))
    from tests.conftest import make_corpus  # the test suite's three-language miniature corpus

    corpus = make_corpus(root / "corpus", docs_per_lang=120)
    pretrain(str(corpus), str(root / "run"), TrainConfig(preset="tiny", seq_len=64, batch_tokens=1024, micro_batch=16,
                                                         max_steps=60, warmup_steps=6, eval_every=0, save_every=60,
                                                         dtype="float32", lr=3e-3))
    return root / "run" / "final", corpus


def decode_speed(model: PaLM, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Tokens/s of the decode steps (the prefill and first token are not counted)."""
    gen = torch.Generator().manual_seed(batch)
    prompts = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=gen).tolist()
    steps = generate_ids(model, prompts, SamplingParams(max_new_tokens=new_tokens, temperature=0,
                                                        stop_at_eos=False))
    next(steps)
    t0 = time.perf_counter()
    n = sum(1 for _ in steps)
    return batch * n / (time.perf_counter() - t0)


def prefill_speed(model: PaLM, batch: int, length: int) -> float:
    """Prompt tokens/s of a prefill into the KV cache (with the first token's logits and sampling)."""
    prompts = torch.randint(3, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    list(generate_ids(model, prompts.tolist(), SamplingParams(max_new_tokens=1, temperature=0, stop_at_eos=False)))
    return batch * length / (time.perf_counter() - t0)


def train_speed(model: PaLM, batch: int, seq_len: int, steps: int = 3) -> float:
    """Training tokens/s (forward, backward, AdamW step), median of `steps` steps after one warm-up step."""
    optimizer = make_optimizer(model, lr=2e-3, weight_decay=0.1)
    autocast = compute_autocast(torch.device("cpu"), torch.bfloat16)
    data = torch.randint(3, model.config.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    model.train()
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        forward_backward(model, data[:, :-1], data[:, 1:], autocast)
        optimizer_step(model, optimizer, grad_clip=1.0)
        times.append(time.perf_counter() - t0)
    model.eval()
    return batch * seq_len / statistics.median(times[1:])


def perplexity(model: PaLM, corpus: Path, langs: list[str], seq_len: int, sequences: int) -> dict[str, float]:
    """Held-out perplexity per language, by palmkit.train.lm_eval.evaluate_lm (as pretraining evaluates)."""
    cfg = TrainConfig(seq_len=seq_len, micro_batch=8, eval_sequences=sequences)
    out = evaluate_lm(model, corpus, langs, cfg, Dist(), contextlib.nullcontext())
    model.eval()
    return {lang: out[f"val/{lang}/ppl"] for lang in langs}


def int8_crossover(rows=(1, 2, 4, 8, 16), shape=(384, 1536), repeats: int = 20) -> dict[int, tuple[float, float]]:
    """Microseconds of Int8Linear's int8 kernel and its dequantised bf16 GEMM at each row count."""
    layer = Int8Linear.from_weight(torch.randn(shape[1], shape[0]) * 0.05)
    out = {}
    for m in rows:
        x = torch.randn(m, shape[0]).bfloat16()
        kernel = lambda: torch._weight_int8pack_mm(x, layer.weight, layer.weight_scale)  # noqa: B023
        dequant = lambda: torch.nn.functional.linear(x, layer.weight.to(x.dtype)) * layer.weight_scale  # noqa: B023
        out[m] = tuple(_median_us(f, repeats) for f in (kernel, dequant))
    return out


def _median_us(fn: Callable, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def build_options(checkpoint: Path, work: Path, args) -> tuple[list[Option], PaLM]:
    """Every option, loaded from the files its command writes where it has its own layout."""
    base, tokenizer, _ = load_checkpoint(checkpoint)
    fp32_size = file_size(checkpoint)
    bf16 = copy.deepcopy(base).to(torch.bfloat16)
    save_checkpoint(work / "bf16", bf16, tokenizer)
    options = [
        Option("fp32", base, fp32_size, lambda: copy.deepcopy(base)),
        Option("fp32 fused", fuse_projections(copy.deepcopy(base)), fp32_size,
               lambda: fuse_projections(copy.deepcopy(base))),
        Option("fp32 oneDNN-packed", pack_for_cpu(copy.deepcopy(base)), fp32_size),
        Option("bf16", load_checkpoint(work / "bf16")[0], file_size(work / "bf16")),
        Option("bf16 fused", fuse_projections(copy.deepcopy(bf16)), file_size(work / "bf16")),
        Option("bf16 oneDNN-packed", pack_for_cpu(copy.deepcopy(bf16)), file_size(work / "bf16")),
    ]
    print(quantize_command(str(checkpoint), str(work / "int8")), flush=True)
    options.append(Option("int8 (own, bf16 act.)", load_checkpoint(work / "int8")[0], file_size(work / "int8")))
    quantize_command(str(checkpoint), str(work / "int8-layers"), embedding=False)
    options.append(Option("int8 layers, bf16 embedding", load_checkpoint(work / "int8-layers")[0],
                          file_size(work / "int8-layers")))
    options += torchao_options(bf16)
    for ratio in args.rank_ratios:
        for steps in sorted({0, args.heal_steps}):
            name = f"svd r={ratio:g}" + (f" + heal {steps}" if steps else "")
            out = work / name.replace(" ", "_").replace("=", "")
            print(compress_command(str(checkpoint), str(out), rank_ratio=ratio, heal_steps=steps,
                                   data=str(args.data) if steps else "", seq_len=args.seq_len, batch=8), flush=True)
            model = load_checkpoint(out)[0]
            options.append(Option(name, model, file_size(out), lambda m=model: copy.deepcopy(m)))
    return options, base


def torchao_options(bf16: PaLM) -> list[Option]:
    """torchao's int8 weight-only and dynamic int8 (eager) on the bf16 model, when torchao is installed."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        return []
    out = []
    for name, config in (("torchao int8 weight-only", Int8WeightOnlyConfig()),
                         ("torchao int8 dynamic", Int8DynamicActivationInt8WeightConfig())):
        model = copy.deepcopy(bf16)
        quantize_(model, config)
        out.append(Option(name, model.eval()))
    return out


def markdown(options: list[Option], langs: list[str], header: str) -> str:
    cols = ["option", "decode b=1 tok/s", "decode b=8 tok/s", "prefill tok/s", "train tok/s", "size MiB",
            "logits rel. err", *(f"ppl {lang}" for lang in langs)]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for o in options:
        speed = [f"{statistics.median(o.speed[k]):,.0f} ({max(o.speed[k]):,.0f})" if o.speed.get(k) else "–"
                 for k in ("decode1", "decode8", "prefill", "train")]
        size = f"{o.size / 2**20:.1f}" if o.size else "–"
        ppl = [f"{o.metrics[lang]:.2f}" for lang in langs]
        lines.append("| " + " | ".join([o.name, *speed, size, f"{o.metrics['rel_err']:.2e}", *ppl]) + " |")
    return "\n".join(lines) + "\n"


def plot(options: list[Option], langs: list[str], path: Path) -> None:
    """Decode speed (best round, the closest to an idle machine) against perplexity, one marker per option."""
    fig = Figure(figsize=(14, 5.5))
    axes = fig.subplots(1, 2)
    markers = "osD^v<>pP*Xhd8"
    for ax, key, title in ((axes[0], "decode1", "decode, batch 1"), (axes[1], "decode8", "decode, batch 8")):
        for i, o in enumerate(options):
            y = math.exp(statistics.mean(math.log(o.metrics[lang]) for lang in langs))
            ax.scatter(max(o.speed[key]), y, s=45, marker=markers[i % len(markers)], label=o.name)
        ax.set(xlabel="tokens/s (best round)", ylabel="held-out perplexity (geometric mean over languages)",
               title=title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="a plain checkpoint (default: pretrain a tiny one here)")
    ap.add_argument("--data", type=Path, help="a corpus built with the checkpoint's tokenizer")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_optimize")
    ap.add_argument("--rank-ratios", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--heal-steps", type=int, default=20)
    ap.add_argument("--seq-len", type=int, default=128, help="training, healing and evaluation windows")
    ap.add_argument("--eval-sequences", type=int, default=16, help="held-out windows per language")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if (args.checkpoint is None) != (args.data is None):
        ap.error("give both --checkpoint and --data, or neither")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.checkpoint is None:
            args.checkpoint, args.data = tiny_setup(work)
        options, base = build_options(args.checkpoint, work, args)
        cfg = base.config
        seq_len = min(args.seq_len, cfg.max_seq_len)
        langs = sorted(p.name for p in (args.data / "shards").iterdir() if (p / "index.json").is_file())
        probe = torch.randint(3, cfg.vocab_size, (4, seq_len), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            ref = base(probe)
            for o in options:
                o.metrics["rel_err"] = float((o.model(probe).float() - ref).norm() / ref.norm())
        for o in options:
            o.metrics.update(perplexity(o.model, args.data, langs, seq_len, args.eval_sequences))
        load_before = os.getloadavg()[0]
        prompt = min(64, cfg.max_seq_len - args.new_tokens - 1)
        for r in range(args.repeats):
            for o in options:
                o.speed.setdefault("decode1", []).append(decode_speed(o.model, 1, prompt, args.new_tokens))
                o.speed.setdefault("decode8", []).append(decode_speed(o.model, 8, prompt, args.new_tokens))
                o.speed.setdefault("prefill", []).append(prefill_speed(o.model, 4, seq_len - 1))
                if o.trainable and r < max(1, args.repeats // 2):
                    o.speed.setdefault("train", []).append(train_speed(o.trainable(), 8, seq_len))
            print(f"round {r + 1}/{args.repeats} done, load average {os.getloadavg()[0]:.2f}", flush=True)
        crossover = int8_crossover(shape=(cfg.d_model, cfg.d_ff))
    header = (f"palmkit.optimize on {args.checkpoint} ({base.num_params() / 1e6:.1f}M parameters, d_model "
              f"{cfg.d_model}, {cfg.n_layers} layers, vocabulary {cfg.vocab_size}); torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}. "
              f"Decode: prompt {prompt} + {args.new_tokens} greedy tokens; prefill 4 x {seq_len - 1} tokens; "
              f"training 8 x {seq_len} tokens, bf16 autocast, AdamW; perplexity on {args.eval_sequences} held-out "
              f"windows of {seq_len} tokens per language. Speeds: median (best) of {args.repeats} rounds; on a shared "
              f"machine the best is the closest to an idle one.")
    table = markdown(options, langs, header)
    table += "\nInt8Linear at d_model x d_ff, microseconds (int8 kernel / dequantised bf16 GEMM): " + ", ".join(
        f"{m} rows {k:.0f} / {d:.0f}" for m, (k, d) in crossover.items()) + "\n"
    (args.out / "bench_optimize.md").write_text(table, encoding="utf-8")
    (args.out / "bench_optimize.json").write_text(json.dumps(
        {o.name: {"speed": o.speed, "metrics": o.metrics, "size": o.size} for o in options}, indent=1))
    plot(options, langs, args.out / "bench_optimize.png")
    print(table)
    print(f"written: {args.out}/bench_optimize.{{md,json,png}}")


if __name__ == "__main__":
    main()
