"""Causal-LM pretraining on the cross-lingual mixture: one process, or many through torchrun.

One process:
    palmkit pretrain --data CORPUS_DIR --out runs/small --train.preset small
Data parallel on one machine (DDP by default; FSDP2 with --train.strategy fsdp):
    torchrun --standalone --nproc_per_node=2 -m palmkit.cli pretrain --data CORPUS_DIR --out runs/ddp
Several machines (run on each, with its own --node-rank):
    torchrun --nnodes=2 --node-rank=0 --nproc_per_node=8 --rdzv-backend=c10d \
        --rdzv-endpoint=HOST0:29500 -m palmkit.cli pretrain --data CORPUS_DIR --out runs/big
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from palmkit.data.shards import MixtureLoader
from palmkit.errors import PalmkitError
from palmkit.io import atomic_write_json, check_destination
from palmkit.model.checkpoint import CHECKPOINT_FILES, load_checkpoint
from palmkit.model.layouts import require_dense
from palmkit.model.palm import PaLM, build_model, preset
from palmkit.model.tokenizer import Tokenizer
from palmkit.train.config import TrainConfig, resume_changes, saved_config
from palmkit.train.distributed import all_reduce, grad_sync, init_distributed, parallelize
from palmkit.train.lm_eval import evaluate_lm
from palmkit.train.metrics import MetricsLog, plot_run
from palmkit.train.perf import keep_freed_memory, measure_matmul_peak
from palmkit.train.state import latest_checkpoint, replace_dir_copy, resume_training_state, save_training_state
from palmkit.train.step import compute_autocast, forward_backward, lr_factor, make_optimizer, optimizer_step


def init_weights(model: PaLM, checkpoint: str, tokenizer: Tokenizer) -> None:
    """Copy the weights of a finished checkpoint into `model`, which must have its shape and tokenizer."""
    source, source_tokenizer, config = load_checkpoint(checkpoint)
    require_dense(config, checkpoint, "continue pretraining")
    # Token ids index the embedding: the same id must mean the same piece, or the weights mean nothing.
    pieces = lambda tok: [tok.piece(i) for i in range(tok.vocab_size)]
    if pieces(source_tokenizer) != pieces(tokenizer):
        raise PalmkitError(f"the tokenizer of {checkpoint} is not the corpus's ({tokenizer.path}): continue "
                           "pretraining on a corpus tokenised with the checkpoint's tokenizer")
    shape = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "rope_theta",
             "norm_eps")
    differ = [f"{k} {getattr(source.config, k)} (preset: {getattr(model.config, k)})" for k in shape
              if getattr(source.config, k) != getattr(model.config, k)]
    if differ:
        trained = config.get("train", {}).get("preset")
        hint = f": it was trained with --train.preset {trained}" if trained else ""
        raise PalmkitError(f"{checkpoint} does not have the preset's shape ({', '.join(differ)}){hint}")
    model.load_state_dict(source.state_dict())


def run_pretraining(cfg: TrainConfig, data: str, out: str, resume: bool = False, init_from: str = "") -> dict:
    """Pretrain a model on the token shards of `data`; returns the final metrics."""
    d = init_distributed()
    if d.device.type == "cpu":
        keep_freed_memory()
    run = Path(out)
    check_destination(run / "final", CHECKPOINT_FILES)  # refused now rather than after the training
    ckpt = latest_checkpoint(run) if resume else None
    if ckpt and (saved := saved_config(run)):
        changes = resume_changes(run, saved, cfg)
        if changes and d.is_main:
            print(f"resuming {run} with options changed since it was saved: {'; '.join(changes)}")
    corpus = Path(data)
    tokenizer = Tokenizer(corpus / "tokenizer.model")
    torch.manual_seed(cfg.seed)
    model_cfg = preset(cfg.preset, vocab_size=tokenizer.vocab_size, max_seq_len=max(cfg.seq_len, 8),
                       dropout=cfg.dropout, z_loss=cfg.z_loss, pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id,
                       eos_id=tokenizer.eos_id)
    if not (cfg.max_steps or cfg.max_minutes):
        raise PalmkitError("give max_steps or max_minutes (or both): with neither the run would never end")
    if cfg.batch_tokens % (cfg.seq_len * d.world_size):
        raise PalmkitError(f"batch_tokens={cfg.batch_tokens} is not a multiple of seq_len x world size "
                           f"({cfg.seq_len} x {d.world_size})")
    global_seqs = cfg.batch_tokens // cfg.seq_len
    per_rank = global_seqs // d.world_size
    micro = min(cfg.micro_batch, per_rank)
    if per_rank % micro:
        raise PalmkitError(f"{per_rank} sequences per rank is not a multiple of micro_batch={micro}")
    accum = per_rank // micro
    loader = MixtureLoader(corpus, cfg.seq_len, global_seqs, cfg.alpha, cfg.seed, d.rank, d.world_size)
    plain = build_model(model_cfg, d.device, seed=cfg.seed)
    if init_from and not ckpt:  # a resumed run restores its own weights, which began as these
        init_weights(plain, init_from, tokenizer)
    model = parallelize(plain, cfg, d)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.optimizer, cfg.embed_lr_ratio)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    step, seconds_before, skipped = 0, 0.0, 0
    if ckpt:  # the newest checkpoint that loads whole: a damaged one is reported and passed over
        resumed = resume_training_state(run, model, optimizer, loader)
        if resumed is None:
            raise PalmkitError(f"no checkpoint of {run} can be loaded (see the warnings): resume from a copy of a "
                               "good one, or start afresh in another --out")
        ckpt, state = resumed
        step, seconds_before, skipped = state["step"], state.get("train_seconds", 0.0), state.get("skipped_batches", 0)
    elif resume and d.is_main:
        print(f"no checkpoint in {run}: starting from scratch")
    compute_dtype = getattr(torch, cfg.dtype)
    autocast = compute_autocast(d.device, compute_dtype)
    log = None
    if d.is_main:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run / "train_config.json", {"train": asdict(cfg), "model": model_cfg.to_dict(),
                                                      "data": str(corpus), "world_size": d.world_size,
                                                      "init_from": init_from})
        log = MetricsLog(run, truncate_after_step=step)
    peak = measure_matmul_peak(compute_dtype, device=d.device,
                               seconds=0.5) * (torch.cuda.device_count() if d.device.type == "cuda" else 1)
    flops_per_step = model_cfg.flops_per_token(cfg.seq_len) * cfg.batch_tokens
    bar = tqdm(total=cfg.max_steps or None, initial=step, disable=not d.is_main, unit="step", dynamic_ncols=True)
    bad = 0
    started = time.perf_counter()
    budget = cfg.max_minutes * 60

    def elapsed() -> float:  # this rank's training time so far, across resumes
        return seconds_before + time.perf_counter() - started

    def seconds() -> float:  # the ranks' mean of it, so that all of them stop together
        return all_reduce([elapsed()], d)[0] / d.world_size if budget else 0.0

    metrics: dict = {}
    model.train()
    while not cfg.max_steps or step < cfg.max_steps:
        t0 = time.perf_counter()
        used = seconds()
        for g, base in zip(optimizer.param_groups, base_lrs, strict=True):
            g["lr"] = base * lr_factor(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio, cfg.schedule,
                                       used / budget if budget else 0.0)
        loss_sum = ce_sum = z_sum = 0.0
        x, y, _ = loader.next_batch()  # this rank's rows of the global batch
        xs, ys = x.split(micro), y.split(micro)
        for m in range(accum):
            with grad_sync(model, m == accum - 1):
                total, ce, z = forward_backward(model, xs[m].to(d.device), ys[m].to(d.device), autocast, accum)
            loss_sum += total.item() / accum
            ce_sum += ce.item() / accum
            z_sum += z.item() / accum
        loss_sum, ce_sum, z_sum = (v / d.world_size for v in all_reduce([loss_sum, ce_sum, z_sum], d))
        # optimizer_step skips the update itself when the gradient is not finite, even with a finite loss
        grad_norm = float(optimizer_step(model, optimizer, cfg.grad_clip)) if math.isfinite(loss_sum) else math.nan
        if not math.isfinite(grad_norm):
            bad += 1
            skipped += 1
            optimizer.zero_grad(set_to_none=True)
            what = "gradient" if math.isfinite(loss_sum) else "loss"
            if log:
                log.log({"step": step, "event": f"non-finite {what}, batch skipped", "consecutive": bad,
                         "skipped_batches": skipped})
            if bad >= cfg.max_bad_steps:
                raise PalmkitError(f"loss or gradient was not finite for {bad} consecutive steps at step {step}: "
                                   "lower --train.lr, raise --train.warmup_steps or train in --train.dtype float32")
            continue
        bad = 0
        step += 1
        dt = time.perf_counter() - t0
        tok_s = cfg.batch_tokens / dt
        mfu = flops_per_step / dt / peak
        metrics = {"step": step, "loss": ce_sum, "z_loss": z_sum, "total_loss": loss_sum, "grad_norm": grad_norm,
                   "lr": optimizer.param_groups[0]["lr"], "tokens_per_s": tok_s, "mfu": mfu,
                   "tokens": step * cfg.batch_tokens, "skipped_batches": skipped}
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
            val = evaluate_lm(getattr(model, "_orig_mod", model), corpus, loader.langs, cfg, d, autocast)
            metrics.update(val)
            if log:
                log.log({"step": step, **val})
                bar.write(f"step {step}: " + "  ".join(f"{k.split('/')[1]} ppl {v:.1f}" for k, v in val.items()
                                                        if k.endswith("/ppl")))
        if (cfg.save_every and step % cfg.save_every == 0) or last:
            save_training_state(run, step, model, optimizer, loader, cfg, tokenizer, plain, d,
                                {"metrics": {k: v for k, v in metrics.items() if isinstance(v, float)},
                                 "train_seconds": train_seconds, "skipped_batches": skipped})
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


def pretrain(data: str, out: str = "runs/pretrain", train: TrainConfig = TrainConfig(), resume: bool = False,
             init_from: str = "") -> dict:
    """Pretrain a PaLM model on a corpus built by `palmkit corpus build`; returns the final metrics.

    Checkpoints (with optimiser, RNG and data-loader state, for an exact resume) go to OUT/checkpoints/step-N,
    the final model to OUT/final, metrics to OUT/metrics.jsonl, OUT/tensorboard and OUT/loss.png, and the
    options to OUT/train_config.json.

    Args:
        data: corpus folder written by `palmkit corpus build` (text, tokenizer.model, shards)
        out: run folder
        train: training options
        resume: continue exactly where the newest checkpoint in OUT stopped (from scratch if there is none).
            On the command line, options not given take their values from OUT/train_config.json. Options that
            differ from the saved ones are printed and used, except preset, seq_len, batch_tokens, alpha, seed,
            optimizer, embed_lr_ratio and fuse_projections: the saved state only fits the run they describe, so
            changing one is an error
        init_from: a finished checkpoint folder (e.g. RUN/final) to take the initial weights from, for
            continued pretraining: the optimiser, schedule and step count start afresh. It must have the
            preset's shape and the corpus's tokenizer
    """
    return run_pretraining(train, data, out, resume, init_from)
