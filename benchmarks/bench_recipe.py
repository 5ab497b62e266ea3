"""Pretraining recipes at equal compute: optimisers, learning rates, model shapes and vocabularies side by side.

Every candidate trains on the same corpus (the quickstart's, or one built from the same text with another
vocabulary size), for the same training time, and is scored on the same held-out text per language. Compute
is fixed on a CPU, so the question is which recipe turns a minute into the lowest loss.

    python benchmarks/bench_recipe.py --corpus runs/quickstart/corpus --minutes 3 --rounds 2
    python benchmarks/bench_recipe.py --minutes 0.5 --candidates adamw adafactor:lr=2e-2 gpt2:lr=1e-3@gpt2-1e-3

A candidate is NAME[:key=value,...][@label], NAME one of CANDIDATES below and the keys its fields (lr, warmup,
model shape, corpus, optimiser settings). A minute is by default a minute of this process's CPU time on one
thread: on a machine that others share, wall-clock minutes buy each candidate whatever the others left it, and
CPU minutes do not depend on them (--clock wall for an idle machine). Candidates train in --rounds slices of
minutes/rounds each, in alternating order (A B C, C B A, ...); compilation (--compile) happens before the
clock starts and is reported apart. The table gives validation cross-entropy per language in nats per token of
the reference corpus's tokenizer (the first --corpus): a candidate on another vocabulary is scored in bits per
byte on the same text and converted, so all columns compare. Tokens processed and wall minutes per candidate
show how much work each one's minutes bought, and how busy the machine was.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from palmkit.data.shards import MixtureLoader, unigram_perplexity
from palmkit.model.loss import fused_lm_loss
from palmkit.model.palm import build_model, causal_attention, preset
from palmkit.model.tokenizer import Tokenizer
from palmkit.train.config import TrainConfig
from palmkit.train.distributed import Dist
from palmkit.train.lm_eval import evaluate_lm
from palmkit.train.optim import PaLMAdafactor
from palmkit.train.perf import keep_freed_memory
from palmkit.train.step import compute_autocast, forward_backward, lr_factor, make_optimizer, optimizer_step

# ----------------------------------------------------------------------------------------------------------------
# The GPT-2-style baseline (Radford et al. 2019): learned positions, GELU MLP, full multi-head attention with
# biases, pre-norm sequential blocks, tied embeddings, N(0, 0.02) init with residual projections scaled by
# 1/sqrt(2 L). Only here, as the recipe most people start from; palmkit does not ship it.

class GPT2Block(nn.Module):
    def __init__(self, d: int, heads: int, d_ff: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, d_ff), nn.Linear(d_ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in self.c_attn(self.ln_1(x)).split(d, -1))
        # the attention palmkit's own model uses when compiled on a CPU, so that speed compares the recipe
        y = causal_attention(q, k, v) if torch.compiler.is_compiling() else \
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, d_ff: int, max_len: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.h = nn.ModuleList(GPT2Block(d, heads, d_ff) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("c_proj.weight", "mlp_proj.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor):
        x = self.wte(idx) + self.wpe.weight[: idx.shape[1]]
        for block in self.h:
            x = block(x)
        # the same chunked output-layer loss as palmkit's model, without z-loss (GPT-2 has none)
        return fused_lm_loss(self.ln_f(x), self.wte.weight, targets, 1.0, z_loss=0.0)


# ----------------------------------------------------------------------------------------------------------------
# Candidates

@dataclass
class Candidate:
    """One recipe: model, vocabulary (through its corpus), optimiser and schedule."""

    model: str = "palm"  # palm or gpt2
    optimizer: str = "adamw"  # adamw, adafactor, adamw_groups (embed_lr for the embedding), muon
    lr: float = 3e-3
    warmup: int = 10
    embed_lr: float = 0.0  # adamw_groups: the embedding's lr (0: lr)
    rest: str = "adafactor"  # muon: the optimiser of the embedding and the norm scales (adamw or adafactor)
    rest_lr: float = 1e-2  # muon: its lr
    adjust_lr: str = "match_rms_adamw"  # muon: torch's adjust_lr_fn (original or match_rms_adamw)
    weight_decay: float = 0.1
    d_model: int = 384
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int = 1
    d_ff: int = 0
    corpus: str = ""  # another corpus folder (another vocabulary of the same text); empty: the reference one
    z_loss: float = 1e-4


CANDIDATES: dict[str, Candidate] = {
    # the quickstart before this study: the small preset, AdamW at lr 3e-3, 10 warm-up steps
    "adamw": Candidate(),
    # palmkit's default since: the mini preset (d_model 256, 4 layers), AdamW at 3e-3 with the embedding at 10x
    "recipe": Candidate(optimizer="adamw_groups", lr=3e-3, embed_lr=3e-2, d_model=256, n_layers=4, n_heads=4),
    # PaLM's own optimiser (section 5), whose parameter scaling the PaLM initialisation assumes
    "adafactor": Candidate(optimizer="adafactor", lr=1e-2),
    # AdamW with the N(0, 1) embedding on a learning rate of its own
    "adamw_groups": Candidate(optimizer="adamw_groups", lr=3e-3, embed_lr=3e-2),
    # torch.optim.Muon on the hidden matrices, Adafactor on the embedding and the norm scales
    "muon": Candidate(optimizer="muon", lr=3e-3, rest="adafactor", rest_lr=1e-2),
    # the GPT-2-style baseline at the same width and depth, AdamW (lr 3e-3, as measured in benchmarks/README.md)
    "gpt2": Candidate(model="gpt2", optimizer="adamw", lr=3e-3, n_kv_heads=6),
}


def parse_candidate(spec: str) -> tuple[str, Candidate]:
    """NAME[:key=value,...][@label] -> (label, Candidate); the label defaults to the spec itself."""
    spec, _, label = spec.partition("@")
    name, _, opts = spec.partition(":")
    if name not in CANDIDATES:
        raise SystemExit(f"unknown candidate {name!r}; choose from {', '.join(CANDIDATES)}")
    types = {f.name: f.type for f in fields(Candidate)}
    changes = {}
    for kv in filter(None, opts.split(",")):
        key, _, value = kv.partition("=")
        if key not in types:
            raise SystemExit(f"unknown field {key!r} in {spec!r}; fields: {', '.join(types)}")
        try:
            changes[key] = value if types[key] == "str" else (int(value) if types[key] == "int" else float(value))
        except ValueError:
            raise SystemExit(f"{key}={value!r} in {spec!r} is not a {types[key]}") from None
    return label or spec, replace(CANDIDATES[name], **changes)


class Chain:
    """Several optimisers stepped as one (Muon on matrices, another on the rest), as optimizer_step expects."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers
        self.param_groups = [g for o in optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)


def build_optimizer(c: Candidate, model: nn.Module):
    """The candidate's optimiser over `model`, each group's "lr" its peak."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    embed = {n for n, p in named if n.startswith(("embed_tokens", "wte", "wpe"))}
    if c.optimizer in ("adamw", "adafactor"):
        return make_optimizer(model, c.lr, c.weight_decay, c.optimizer)
    if c.optimizer == "adamw_groups":  # palmkit's AdamW with the embedding in a group of its own
        return make_optimizer(model, c.lr, c.weight_decay, "adamw", (c.embed_lr or c.lr) / c.lr)
    if c.optimizer == "muon":
        matrices = [p for n, p in named if n not in embed and p.dim() == 2]
        rest = [p for n, p in named if n in embed or p.dim() != 2]
        muon = torch.optim.Muon(matrices, lr=c.lr, weight_decay=c.weight_decay, adjust_lr_fn=c.adjust_lr)
        other = make_optimizer(rest, c.rest_lr, c.weight_decay, c.rest)
        return Chain(muon, other)
    raise SystemExit(f"unknown optimizer {c.optimizer!r}")


class Trial:
    """A candidate's model, optimiser, data stream and clock, trained slice by slice."""

    def __init__(self, label: str, c: Candidate, corpus: Path, args):
        self.label, self.c, self.corpus = label, c, corpus
        self.seq_len, self.batch_tokens, self.budget = args.seq_len, args.batch_tokens, args.minutes * 60
        vocab = Tokenizer(corpus / "tokenizer.model").vocab_size
        torch.manual_seed(args.seed)
        if c.model == "gpt2":
            self.model = GPT2(vocab, c.d_model, c.n_layers, c.n_heads, c.d_ff or 4 * c.d_model, args.seq_len)
        else:
            cfg = preset("small", vocab_size=vocab, d_model=c.d_model, n_layers=c.n_layers, n_heads=c.n_heads,
                         n_kv_heads=c.n_kv_heads, d_ff=c.d_ff, max_seq_len=args.seq_len, z_loss=c.z_loss)
            self.model = build_model(cfg, seed=args.seed)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.optimizer = build_optimizer(c, self.model)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.loader = MixtureLoader(corpus, args.seq_len, args.batch_tokens // args.seq_len, 0.3, args.seed)
        self.micro = min(args.micro_batch, args.batch_tokens // args.seq_len)
        self.autocast = compute_autocast(torch.device("cpu"), torch.bfloat16)
        self.step_fn = torch.compile(self.model, dynamic=False) if args.compile else self.model
        self.steps, self.seconds, self.compile_seconds, self.loss = 0, 0.0, 0.0, float("nan")
        self.clock, self.wall_seconds, self.cpu_seconds = args.clock, 0.0, 0.0
        if args.compile:  # compile before the clock: one forward and backward on random tokens, no update
            t0 = time.perf_counter()
            x = torch.randint(0, vocab, (self.micro, args.seq_len))
            forward_backward(self.step_fn, x, x, self.autocast)
            self.optimizer.zero_grad(set_to_none=True)
            self.compile_seconds = time.perf_counter() - t0

    def train(self, seconds: float) -> None:
        """Train until this candidate has used `seconds` more of its budget (or all of it)."""
        until = min(self.budget, self.seconds + seconds)
        self.model.train()
        while self.seconds < until:
            t0, c0 = time.perf_counter(), time.process_time()
            factor = lr_factor(self.steps, self.c.warmup, 0, 0.1, "cosine", self.seconds / self.budget)
            for g, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
                g["lr"] = base * factor
            x, y, _ = self.loader.next_batch()
            accum = x.shape[0] // self.micro
            ce_sum = 0.0
            for xs, ys in zip(x.split(self.micro), y.split(self.micro), strict=True):
                ce_sum += forward_backward(self.step_fn, xs, ys, self.autocast, accum)[1].item() / accum
            optimizer_step(self.model, self.optimizer, 1.0)
            self.steps += 1
            self.loss = ce_sum
            self.wall_seconds += time.perf_counter() - t0
            self.cpu_seconds += time.process_time() - c0
            self.seconds = self.cpu_seconds if self.clock == "cpu" else self.wall_seconds

    def evaluate(self, langs: list[str], windows: int) -> dict[str, float]:
        """Held-out cross-entropy and bits per byte per language (eager, bf16 autocast)."""
        cfg = TrainConfig(seq_len=self.seq_len, micro_batch=self.micro, eval_sequences=windows)
        return evaluate_lm(self.model, self.corpus, langs, cfg, Dist(), self.autocast)


class LoopAdafactor(PaLMAdafactor):
    """The same update one parameter at a time (palmkit's Adafactor before it ran as multi-tensor kernels)."""

    def _update(self, params: list[torch.Tensor], k: float, group: dict) -> None:
        for p in params:
            super()._update([p], k, group)


def optimizer_step_times(repeats: int = 20) -> str:
    """CPU milliseconds per optimizer.step() on the small preset's parameters (16k vocabulary), random gradients:
    the median of `repeats`, in CPU time so that other work on the machine does not count."""
    model = build_model(preset("small", vocab_size=16000, max_seq_len=256), seed=0)
    named = {"AdamW (fused)": lambda: make_optimizer(model, 3e-3, 0.1),
             "AdamW, embedding group (fused)": lambda: make_optimizer(model, 3e-3, 0.1, embed_lr_ratio=10.0),
             "Adafactor, per-parameter loop": lambda: LoopAdafactor(model.parameters()),
             "Adafactor, multi-tensor": lambda: PaLMAdafactor(model.parameters()),
             "Muon (matrices) + Adafactor": lambda: build_optimizer(CANDIDATES["muon"], model)}
    grads = [torch.randn_like(p) * 1e-3 for p in model.parameters()]
    rows = ["| optimiser | CPU ms per step |", "|---|---:|"]
    for name, make in named.items():
        opt, times = make(), []
        for _ in range(repeats):
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g.clone()
            t0 = time.process_time()
            opt.step()
            times.append(time.process_time() - t0)
        rows.append(f"| {name} | {sorted(times)[len(times) // 2] * 1e3:.1f} |")
    return "\n".join(rows)


def bytes_per_token(corpus: Path, lang: str) -> float:
    """UTF-8 bytes per token of a language's validation split."""
    info = json.loads((corpus / "shards" / lang / "index.json").read_text())["valid"]
    return info["bytes"] / info["tokens"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default="runs/quickstart/corpus",
                    help="reference corpus (palmkit quickstart builds it in runs/quickstart/corpus)")
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), help="NAME[:key=value,...][@label]")
    ap.add_argument("--minutes", type=float, default=6.0, help="training time per candidate")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="what a minute is: this process's CPU time (with --threads 1, a minute of one idle core, "
                         "whatever else the machine runs), or wall-clock time (only fair on an idle machine)")
    ap.add_argument("--rounds", type=int, default=2, help="slices per candidate, run in alternating order")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--eval-windows", type=int, default=0,
                    help="validation windows per language; 0: the whole validation split (the same text for "
                         "every vocabulary)")
    ap.add_argument("--compile", action="store_true", help="torch.compile each model (before its clock starts)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 0: torch's default. More than one makes CPU time count threads that wait")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="", help="write the results here as JSON")
    ap.add_argument("--step-times", action="store_true",
                    help="only time one optimiser step of each optimiser (median of 20) and exit")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.step_times:
        print(optimizer_step_times())
        return
    keep_freed_memory()
    torch._dynamo.config.cache_size_limit = 64  # one graph per candidate's shape, all in one process
    reference = Path(args.corpus)
    if not (reference / "shards").is_dir():
        raise SystemExit(f"no corpus at {reference}: run `palmkit quickstart` (it builds runs/quickstart/corpus) or "
                         "give --corpus")
    langs = sorted(p.name for p in (reference / "shards").iterdir() if (p / "index.json").is_file())
    specs = [parse_candidate(s) for s in args.candidates]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.minutes:g} {args.clock} min per "
          f"candidate in "
          f"{args.rounds} rounds, batch {args.batch_tokens} tokens, load average {os.getloadavg()[0]:.2f}",
          flush=True)
    trials = []
    for label, c in specs:
        trial = Trial(label, c, Path(c.corpus) if c.corpus else reference, args)
        print(f"{label}: {trial.params / 1e6:.1f}M parameters, compiled in {trial.compile_seconds:.0f} s", flush=True)
        trials.append(trial)
    started = time.time()
    for r in range(args.rounds):
        order = trials if r % 2 == 0 else trials[::-1]
        for t in order:
            load = os.getloadavg()[0]
            t.train(t.budget / args.rounds)
            print(f"round {r + 1}: {t.label}: {t.steps} steps, train loss {t.loss:.3f}, {t.cpu_seconds:.0f} s CPU "
                  f"in {t.wall_seconds:.0f} s wall, load average {load:.1f}", flush=True)
    results = {}
    for t in trials:
        val = t.evaluate(langs, args.eval_windows)
        # nats per reference-tokenizer token: bits per byte x ln 2 x the reference's bytes per token
        ce = {lang: val[f"val/{lang}/bpb"] * math.log(2) * bytes_per_token(reference, lang) for lang in langs}
        results[t.label] = {"candidate": asdict(t.c), "params": t.params, "steps": t.steps,
                            "tokens": t.steps * t.batch_tokens, "wall_seconds": t.wall_seconds,
                            "cpu_seconds": t.cpu_seconds,
                            "compile_seconds": t.compile_seconds, "ce": ce, "mean_ce": sum(ce.values()) / len(ce),
                            "bpb": {lang: val[f"val/{lang}/bpb"] for lang in langs}}
    unigram = {lang: math.log(unigram_perplexity(reference, lang)) for lang in langs}
    labels = [t.label for t in trials]
    lines = ["| language | " + " | ".join(labels) + " | unigram |", "|---|" + "---:|" * (len(labels) + 1)]
    for lang in langs:
        lines.append(f"| {lang} | " + " | ".join(f"{results[x]['ce'][lang]:.2f}" for x in labels)
                     + f" | {unigram[lang]:.2f} |")
    lines.append("| **mean** | " + " | ".join(f"**{results[x]['mean_ce']:.3f}**" for x in labels)
                 + f" | {sum(unigram.values()) / len(langs):.2f} |")
    first = results[labels[0]]["mean_ce"]
    lines.append("| mean - first | " + " | ".join(f"{results[x]['mean_ce'] - first:+.3f}" for x in labels) + " | |")
    lines.append("| tokens (M) | " + " | ".join(f"{results[x]['tokens'] / 1e6:.2f}" for x in labels) + " | |")
    lines.append("| wall minutes | " + " | ".join(f"{results[x]['wall_seconds'] / 60:.1f}" for x in labels) + " | |")
    lines.append("| parameters (M) | " + " | ".join(f"{results[x]['params'] / 1e6:.1f}" for x in labels) + " | |")
    print(f"\nvalidation cross-entropy, nats per token of {reference}'s tokenizer "
          f"({(time.time() - started) / 60:.0f} min of training and evaluation):\n" + "\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "unigram_ce": unigram, "results": results},
                                              indent=1))


if __name__ == "__main__":
    main()
