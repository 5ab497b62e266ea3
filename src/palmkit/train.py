"""Causal-LM pretraining on the cross-lingual mixture: one process, or many through torchrun.

One process:
    palmkit pretrain --preset small --data CORPUS_DIR --out runs/small
Data parallel on one machine (DDP by default; FSDP2 with --strategy fsdp):
    torchrun --standalone --nproc_per_node=2 -m palmkit.cli pretrain --data CORPUS_DIR --out runs/ddp
Several machines (run on each, with its own --node-rank):
    torchrun --nnodes=2 --node-rank=0 --nproc_per_node=8 --rdzv-backend=c10d \
        --rdzv-endpoint=HOST0:29500 -m palmkit.cli pretrain --data CORPUS_DIR --out runs/big

The model knows nothing of parallelism: `parallelize()` wraps it. gloo serves CPUs, NCCL GPUs.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import shutil
import time
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from tqdm import tqdm

from palmkit.checkpoint import (
    atomic_write_json,
    load_json,
    load_tensors,
    replace_dir,
    save_checkpoint,
    save_tensors,
)
from palmkit.data import MixtureLoader, validation_batches
from palmkit.errors import PalmkitError
from palmkit.metrics import MetricsLog, plot_run
from palmkit.model import PaLM, build_model, preset
from palmkit.optimize import fuse_projections, fused_state_dict, is_fused, plain_state_dict
from palmkit.tokenizer import Tokenizer


@dataclass
class TrainConfig:
    """Everything that defines a pretraining run (saved in every checkpoint)."""

    preset: str = "small"
    seq_len: int = 256
    batch_tokens: int = 16384  # global batch in tokens; accumulation is derived from it and the world size
    micro_batch: int = 16  # sequences per forward pass on each rank
    max_steps: int = 2000  # 0: no step limit (then max_minutes ends the run)
    # Stop (with a checkpoint) after this much training time, counted across resumes; 0: no limit. The cosine
    # then decays over whichever of the two budgets runs out first, so a timed run always ends at min_lr.
    max_minutes: float = 0.0
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    schedule: Literal["cosine", "rsqrt"] = "cosine"
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    z_loss: float = 1e-4
    dropout: float = 0.0
    dtype: Literal["fp32", "bf16"] = "bf16"
    compile: bool = False
    activation_checkpointing: bool = False
    alpha: float = 0.3
    eval_every: int = 100
    eval_sequences: int = 16
    save_every: int = 200
    keep_last: int = 2
    log_every: int = 10
    seed: int = 0
    max_bad_steps: int = 5
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # q, k, v, gate, up as one GEMM (issue 7); checkpoints stay plain. Exact with AdamW; Adafactor's per-matrix
    # RMS scaling then spans the fused matrix, so its updates differ slightly.
    fuse_projections: bool = False


# --------------------------------------------------------------------------------------------------
# Optimisers and schedules


class PaLMAdafactor(torch.optim.Optimizer):
    """PaLM's optimiser (section 5): Adafactor without factorisation, i.e. Adam with parameter scaling.

    beta2 = 1 - k^-0.8, updates clipped to RMS 1, step scaled by max(1e-3, RMS(param)), weight decay lr^2.
    """

    def __init__(self, params, lr: float = 1e-2, beta1: float = 0.9, decay_rate: float = 0.8,
                 eps: float = 1e-30, scale_eps: float = 1e-3, clip: float = 1.0, decay_power: float = 2.0):
        super().__init__(params, dict(lr=lr, beta1=beta1, decay_rate=decay_rate, eps=eps, scale_eps=scale_eps,
                                      clip=clip, decay_power=decay_power))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                k = state["step"].item()
                beta2 = 1.0 - k ** -group["decay_rate"]
                g = p.grad.float()
                state["exp_avg_sq"].mul_(beta2).add_(g.square() + group["eps"], alpha=1 - beta2)
                update = g / state["exp_avg_sq"].sqrt()
                update /= (update.square().mean().sqrt() / group["clip"]).clamp(min=1.0)
                state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
                scale = p.float().square().mean().sqrt().clamp(min=group["scale_eps"])
                p.mul_(1 - lr ** group["decay_power"])
                p.add_(state["exp_avg"] * scale, alpha=-lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on 2-D weights only (not LayerNorm scales), or PaLM's Adafactor."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adafactor":
        return PaLMAdafactor(params, lr=cfg.lr)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel reads and writes each tensor once; the default on CPU is ~10 passes (issue 4).
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def lr_factor(step: int, cfg: TrainConfig, time_used: float = 0.0) -> float:
    """Multiplier of the peak learning rate at `step` (0-based): linear warm-up, then cosine or 1/sqrt(k).

    `time_used` is the fraction of max_minutes spent; the cosine follows steps or time, whichever is further.
    """
    warm = max(1, cfg.warmup_steps)
    if step < cfg.warmup_steps:
        return (step + 1) / warm
    if cfg.schedule == "rsqrt":  # PaLM: constant for the warm-up steps, then decay as 1/sqrt(k)
        return math.sqrt(warm / (step + 1))
    by_steps = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps) if cfg.max_steps else 0.0
    progress = min(1.0, max(by_steps, time_used if cfg.max_minutes else 0.0))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------------
# Distributed set-up


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the process group that torchrun describes in the environment; a lone process needs none."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        # NCCL moves GPU tensors over NVLink/InfiniBand; gloo is the CPU backend.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


def parallelize(model: PaLM, cfg: TrainConfig, d: Dist) -> torch.nn.Module:
    """Activation checkpointing, then FSDP2 or DDP, then compile, in torchtitan's fixed order."""
    if cfg.fuse_projections:
        fuse_projections(model)
    if cfg.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block)
    if d.world_size > 1 and cfg.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)  # each block's parameters are gathered only while it runs
        fully_shard(model)
    elif d.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    return model


def _all_reduce(values: list[float], d: Dist) -> list[float]:
    if d.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def _grad_sync(model: torch.nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    inner = getattr(model, "_orig_mod", model)
    if hasattr(inner, "no_sync") and not enabled:
        return inner.no_sync()
    if hasattr(inner, "set_requires_gradient_sync"):
        inner.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# Checkpoints with the full training state


def _flatten(prefix: str, obj, tensors: dict, meta):
    """Split a nested state into safetensors tensors and a JSON skeleton that points at them."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {str(k): _flatten(f"{prefix}.{k}", v, tensors, meta) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_flatten(f"{prefix}.{i}", v, tensors, meta) for i, v in enumerate(obj)]
    return obj


def _unflatten(obj, tensors: dict):
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict):
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_training_state(run: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        loader: MixtureLoader, cfg: TrainConfig, tokenizer: Tokenizer, plain: PaLM, d: Dist,
                        extra: dict) -> Path | None:
    """Write run/checkpoints/step-N atomically (a plain checkpoint plus optimiser, RNG and data state)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=options)  # collective under FSDP: every rank calls it
    optim_sd = get_optimizer_state_dict(model, optimizer, options=options)
    if not d.is_main:
        return None
    ckpt_root = run / "checkpoints"
    target = ckpt_root / f"step-{step:07d}"
    staging = ckpt_root / f".step-{step:07d}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    with torch.device("meta"):
        shell = PaLM(plain.config)
    model_sd = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in model_sd.items()}
    shell.load_state_dict(plain_state_dict(model_sd, plain.config), assign=True)
    save_checkpoint(staging, shell, tokenizer, extra={"train": asdict(cfg), "step": step, **extra})
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    skeleton = _flatten("optim", optim_sd, tensors, None)
    save_tensors(staging / "optimizer.safetensors", tensors)
    atomic_write_json(staging / "trainer_state.json", {"step": step, "optimizer": skeleton,
                                                       "loader": loader.state_dict(), **extra})
    replace_dir(staging, target)
    atomic_write_json(run / "latest.json", {"step": step, "path": target.name})
    old = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for p in old[: max(0, len(old) - cfg.keep_last)]:
        shutil.rmtree(p, ignore_errors=True)
    return target


def latest_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    latest = run / "latest.json"
    if latest.is_file():
        path = run / "checkpoints" / load_json(latest)["path"]
        if (path / "trainer_state.json").is_file():
            return path
    done = sorted(p for p in (run / "checkpoints").glob("step-*") if (p / "trainer_state.json").is_file())
    return done[-1] if done else None


def load_training_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        loader: MixtureLoader) -> dict:
    """Restore model, optimiser, RNG and loader from a checkpoint; returns trainer_state.json."""
    state = load_json(path / "trainer_state.json")
    tensors = load_tensors(path / "optimizer.safetensors")
    weights = load_tensors(path / "model.safetensors")
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if is_fused(model):  # checkpoints hold the plain layout
        weights = fused_state_dict(weights)
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(model, optimizer, _unflatten(state["optimizer"], tensors), options=options)
    torch.set_rng_state(tensors["rng.torch"])
    loader.load_state_dict(state["loader"])
    return state


# --------------------------------------------------------------------------------------------------
# Evaluation and throughput


@torch.no_grad()
def evaluate(model: torch.nn.Module, corpus: str | Path, langs: list[str], cfg: TrainConfig, d: Dist,
             autocast) -> dict[str, float]:
    """Held-out loss, perplexity and bits per byte per language (summed over ranks)."""
    model.eval()
    out: dict[str, float] = {}
    for lang in langs:
        batches, _, bytes_per_token = validation_batches(corpus, lang, cfg.seq_len, cfg.micro_batch,
                                                         cfg.eval_sequences, d.rank, d.world_size)
        total = count = 0.0
        for inputs, targets in batches:
            with autocast:
                _, ce, _ = model(inputs.to(d.device), targets=targets.to(d.device))
            n = int((targets != -100).sum())
            total, count = total + ce.item() * n, count + n
        total, count = _all_reduce([total, count], d)
        loss = total / max(count, 1)
        out[f"val/{lang}/loss"] = loss
        out[f"val/{lang}/ppl"] = math.exp(min(loss, 50))
        out[f"val/{lang}/bpb"] = loss / math.log(2) / bytes_per_token
    model.train()
    return out


def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks for reuse instead of unmapping them; True if it took the setting.

    By default a block of more than a few MB goes back to the OS when freed, and the next step touches
    fresh pages: every large activation and gradient is page-faulted in again, which costs CPU training
    about a fifth of its time (issue 4). Memory then stays at its peak, which a training run reaches anyway.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return False
    m_trim_threshold, m_mmap_threshold, limit = -1, -3, 2**31 - 1  # mallopt takes a C int
    return bool(libc.mallopt(m_mmap_threshold, limit) and libc.mallopt(m_trim_threshold, limit))


def measure_matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048, seconds: float = 1.0,
                        device: str | torch.device = "cpu") -> float:
    """Best FLOP/s of an n x n matmul in `dtype` over about `seconds`: the denominator of MFU."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up (and oneDNN/MKL kernel selection)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        a @ b
        if a.device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


# --------------------------------------------------------------------------------------------------
# The training loop


def compute_autocast(cfg: TrainConfig, device: torch.device) -> torch.autocast:
    """bf16 matmuls and attention with fp32 weights, residual stream and loss; fp32 everywhere otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")


def forward_backward(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, cfg: TrainConfig,
                     autocast, accum: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss (total, cross-entropy, z-loss) of one of `accum` micro-batches; adds its gradients / accum to .grad."""
    with autocast:
        total, ce, z = model(inputs, targets=targets)
    (total / accum).backward()
    return total.detach(), ce.detach(), z.detach()


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.Tensor:
    """Clip the gradient norm, update the weights and clear the gradients; returns the norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def train(cfg: TrainConfig, data: str, out: str, resume: bool = False) -> dict:
    """Pretrain a model on the token shards of `data`; returns the final metrics."""
    d = init_distributed()
    if d.device.type == "cpu":
        keep_freed_memory()
    run = Path(out)
    corpus = Path(data)
    tokenizer = Tokenizer(corpus / "tokenizer.model")
    torch.manual_seed(cfg.seed)
    model_cfg = preset(cfg.preset, vocab_size=tokenizer.vocab_size, max_seq_len=max(cfg.seq_len, 8),
                       dropout=cfg.dropout, z_loss=cfg.z_loss, pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id,
                       eos_id=tokenizer.eos_id)
    if not (cfg.max_steps or cfg.max_minutes):
        raise ValueError("give max_steps or max_minutes (or both): with neither the run would never end")
    if cfg.batch_tokens % (cfg.seq_len * d.world_size):
        raise ValueError(f"batch_tokens={cfg.batch_tokens} is not a multiple of seq_len x world size "
                         f"({cfg.seq_len} x {d.world_size})")
    global_seqs = cfg.batch_tokens // cfg.seq_len
    per_rank = global_seqs // d.world_size
    micro = min(cfg.micro_batch, per_rank)
    if per_rank % micro:
        raise ValueError(f"{per_rank} sequences per rank is not a multiple of micro_batch={micro}")
    accum = per_rank // micro
    loader = MixtureLoader(corpus, cfg.seq_len, global_seqs, cfg.alpha, cfg.seed, d.rank, d.world_size)
    plain = build_model(model_cfg, d.device, seed=cfg.seed)
    model = parallelize(plain, cfg, d)
    optimizer = make_optimizer(model, cfg)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    step, seconds_before = 0, 0.0
    if resume and (ckpt := latest_checkpoint(run)):
        state = load_training_state(ckpt, model, optimizer, loader)
        step, seconds_before = state["step"], state.get("train_seconds", 0.0)
    elif resume and d.is_main:
        print(f"no checkpoint in {run}: starting from scratch")
    autocast = compute_autocast(cfg, d.device)
    log = None
    if d.is_main:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run / "train_config.json", {"train": asdict(cfg), "model": model_cfg.to_dict(),
                                                      "data": str(corpus), "world_size": d.world_size})
        log = MetricsLog(run, truncate_after_step=step)
    peak = measure_matmul_peak(torch.bfloat16 if cfg.dtype == "bf16" else torch.float32, device=d.device,
                               seconds=0.5) * (torch.cuda.device_count() if d.device.type == "cuda" else 1)
    flops_per_step = model_cfg.flops_per_token(cfg.seq_len) * cfg.batch_tokens
    bar = tqdm(total=cfg.max_steps or None, initial=step, disable=not d.is_main, unit="step", dynamic_ncols=True)
    bad = 0
    started = time.perf_counter()
    budget = cfg.max_minutes * 60

    def elapsed() -> float:  # this rank's training time so far, across resumes
        return seconds_before + time.perf_counter() - started

    def seconds() -> float:  # the ranks' mean of it, so that all of them stop together
        return _all_reduce([elapsed()], d)[0] / d.world_size if budget else 0.0

    metrics: dict = {}
    model.train()
    while not cfg.max_steps or step < cfg.max_steps:
        t0 = time.perf_counter()
        used = seconds()
        for g, base in zip(optimizer.param_groups, base_lrs, strict=True):
            g["lr"] = base * lr_factor(step, cfg, used / budget if budget else 0.0)
        loss_sum = ce_sum = z_sum = 0.0
        x, y, _ = loader.next_batch()  # this rank's rows of the global batch
        xs, ys = x.split(micro), y.split(micro)
        for m in range(accum):
            with _grad_sync(model, m == accum - 1):
                total, ce, z = forward_backward(model, xs[m].to(d.device), ys[m].to(d.device), cfg, autocast,
                                                accum)
            loss_sum += total.item() / accum
            ce_sum += ce.item() / accum
            z_sum += z.item() / accum
        loss_sum, ce_sum, z_sum = (v / d.world_size for v in _all_reduce([loss_sum, ce_sum, z_sum], d))
        if not math.isfinite(loss_sum):
            bad += 1
            optimizer.zero_grad(set_to_none=True)
            if log:
                log.log({"step": step, "event": "non-finite loss, batch skipped", "consecutive": bad})
            if bad >= cfg.max_bad_steps:
                raise PalmkitError(f"loss was not finite for {bad} consecutive steps at step {step}: "
                                   "lower --lr, raise --warmup-steps or train in --dtype fp32")
            continue
        bad = 0
        grad_norm = float(optimizer_step(model, optimizer, cfg))
        step += 1
        dt = time.perf_counter() - t0
        tok_s = cfg.batch_tokens / dt
        mfu = flops_per_step / dt / peak
        metrics = {"step": step, "loss": ce_sum, "z_loss": z_sum, "total_loss": loss_sum, "grad_norm": grad_norm,
                   "lr": optimizer.param_groups[0]["lr"], "tokens_per_s": tok_s, "mfu": mfu,
                   "tokens": step * cfg.batch_tokens}
        if budget and not cfg.max_steps:
            # a timed run's length in steps is an estimate, kept current so the bar's ETA means something
            bar.total = max(step + 1, round(step / elapsed() * budget))
        bar.update(1)
        bar.set_postfix(loss=f"{ce_sum:.3f}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.0%}")
        train_seconds = seconds() if budget else elapsed()  # what decides the stop is what a resume continues
        out_of_time = budget > 0 and train_seconds >= budget
        last = step == cfg.max_steps or out_of_time
        if log and (step % cfg.log_every == 0 or last):
            log.log(metrics)
        if cfg.eval_every and (step % cfg.eval_every == 0 or last):
            # eager: under no_grad and eval() a compiled model would compile new graphs for a few forward passes
            val = evaluate(getattr(model, "_orig_mod", model), corpus, loader.langs, cfg, d, autocast)
            metrics.update(val)
            if log:
                log.log({"step": step, **val})
                bar.write(f"step {step}: " + "  ".join(f"{k.split('/')[1]} ppl {v:.1f}" for k, v in val.items()
                                                        if k.endswith("/ppl")))
        if (cfg.save_every and step % cfg.save_every == 0) or last:
            save_training_state(run, step, model, optimizer, loader, cfg, tokenizer, plain, d,
                                {"metrics": {k: v for k, v in metrics.items() if isinstance(v, float)},
                                 "train_seconds": train_seconds})
        if out_of_time:
            break
    bar.close()
    if d.is_main and log:
        log.close()
        final = latest_checkpoint(run)
        if final:
            replace_dir_copy(final, run / "final")
        if (run / "metrics.jsonl").stat().st_size:
            plot_run(str(run))
    return metrics


def replace_dir_copy(src: Path, dst: Path) -> None:
    """Copy checkpoint `src` to `dst` (model files only), replacing `dst` atomically."""
    staging = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in ("model.safetensors", "config.json", "tokenizer.model"):
        shutil.copyfile(src / name, staging / name)
    replace_dir(staging, dst)


def pretrain(data: str, out: str = "runs/pretrain", resume: bool = False, **options) -> dict:
    """Pretrain a PaLM model on a corpus built by `palmkit corpus build`; see TrainConfig for options."""
    names = {f.name for f in fields(TrainConfig)}
    unknown = set(options) - names
    if unknown:
        raise ValueError(f"unknown option(s): {', '.join(sorted(unknown))}")
    return train(TrainConfig(**options), data, out, resume)


def _cli_signature():
    """`palmkit pretrain` options: TrainConfig's fields, plus data/out/resume."""
    import inspect

    params = [inspect.Parameter("data", inspect.Parameter.KEYWORD_ONLY, annotation=str),
              inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, default="runs/pretrain", annotation=str),
              inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool)]
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                        annotation=hints[f.name]))
    return inspect.Signature(params)


def pretrain_command(**kwargs) -> str:
    """Pretrain a PaLM model on a corpus built by `palmkit corpus build`.

    Checkpoints go to OUT/checkpoints/step-N (with optimiser, RNG and data-loader state, for --resume);
    the final model to OUT/final; metrics to OUT/metrics.jsonl, OUT/tensorboard and OUT/loss.png.
    """
    metrics = pretrain(**kwargs)
    return json.dumps({k: round(v, 4) for k, v in metrics.items() if isinstance(v, float) and "/" in k}, indent=1)


pretrain_command.__signature__ = _cli_signature()
