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
from palmkit.train.config import TrainConfig, engine_config, resume_changes, saved_config
from palmkit.train.distributed import init_distributed
from palmkit.train.engine import BudgetClock, Engine, LRSchedule, every
from palmkit.train.lm_eval import evaluate_lm
from palmkit.train.metrics import MetricsLog, plot_run
from palmkit.train.perf import keep_freed_memory, measure_matmul_peak
from palmkit.train.state import (
    latest_checkpoint,
    plain_weights,
    replace_dir_copy,
    resume_training_state,
    save_training_state,
)


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


class Pretraining:
    """One pretraining run on the engine: `setup` in the constructor, then `run` repeats `step` with periodic
    log, eval and save until the step or time budget is spent."""

    def __init__(self, cfg: TrainConfig, data: str, out: str, resume: bool = False, init_from: str = "",
                 device: str = ""):
        self.cfg, self.d, self.run_dir, self.corpus = cfg, init_distributed(device), Path(out), Path(data)
        d = self.d
        if d.device.type == "cpu":
            keep_freed_memory()
        check_destination(self.run_dir / "final", CHECKPOINT_FILES)  # refused now rather than after the training
        ckpt = latest_checkpoint(self.run_dir) if resume else None
        if ckpt and (saved := saved_config(self.run_dir)):
            changes = resume_changes(self.run_dir, saved, cfg)
            if changes and d.is_main:
                print(f"resuming {self.run_dir} with options changed since it was saved: {'; '.join(changes)}")
        self.tokenizer = Tokenizer(self.corpus / "tokenizer.model")
        torch.manual_seed(cfg.seed)
        self.model_cfg = preset(cfg.preset, vocab_size=self.tokenizer.vocab_size, max_seq_len=max(cfg.seq_len, 8),
                                dropout=cfg.dropout, z_loss=cfg.z_loss, pad_id=self.tokenizer.pad_id,
                                bos_id=self.tokenizer.bos_id, eos_id=self.tokenizer.eos_id)
        self.accum, self.micro = self._batch_shape()
        self.loader = MixtureLoader(self.corpus, cfg.seq_len, cfg.batch_tokens // cfg.seq_len, cfg.alpha, cfg.seed,
                                    d.rank, d.world_size)
        self.plain = build_model(self.model_cfg, d.device, seed=cfg.seed)
        if init_from and not ckpt:  # a resumed run restores its own weights, which began as these
            init_weights(self.plain, init_from, self.tokenizer)
        self.engine = Engine(self.plain, engine_config(cfg), d, cfg.lr,
                             LRSchedule(cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio, cfg.schedule),
                             cfg.weight_decay, cfg.optimizer, cfg.embed_lr_ratio)
        self.step_no, seconds_before = 0, 0.0
        if ckpt:
            seconds_before = self._resume()
        elif resume and d.is_main:
            print(f"no checkpoint in {self.run_dir}: starting from scratch")
        self.clock = BudgetClock(cfg.max_minutes, seconds_before, d)
        self.log = None
        if d.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.run_dir / "train_config.json",
                              {"train": asdict(cfg), "model": self.model_cfg.to_dict(), "data": str(self.corpus),
                               "world_size": d.world_size, "init_from": init_from})
            self.log = MetricsLog(self.run_dir, truncate_after_step=self.step_no)
        # MFU's denominator: the peak of every process's device, one device per process
        self.peak = measure_matmul_peak(self.engine.dtype, device=d.device, seconds=0.5) * d.world_size
        self.flops_per_step = self.model_cfg.flops_per_token(cfg.seq_len) * cfg.batch_tokens
        self.peak_remeasures = 0

    def _batch_shape(self) -> tuple[int, int]:
        """(micro-batches per step, sequences per micro-batch) on each rank for the global batch."""
        cfg, d = self.cfg, self.d
        if not (cfg.max_steps or cfg.max_minutes):
            raise PalmkitError("give max_steps or max_minutes (or both): with neither the run would never end")
        if cfg.batch_tokens % (cfg.seq_len * d.world_size):
            raise PalmkitError(f"batch_tokens={cfg.batch_tokens} is not a multiple of seq_len x world size "
                               f"({cfg.seq_len} x {d.world_size})")
        per_rank = cfg.batch_tokens // cfg.seq_len // d.world_size
        micro = min(cfg.micro_batch, per_rank)
        if per_rank % micro:
            raise PalmkitError(f"{per_rank} sequences per rank is not a multiple of micro_batch={micro}")
        return per_rank // micro, micro

    def _resume(self) -> float:
        """Restore the newest checkpoint that loads whole (a damaged one is reported and passed over); returns
        the training seconds it had spent."""
        resumed = resume_training_state(self.run_dir, self.engine.model, self.engine.optimizer, self.d)
        if resumed is None:
            raise PalmkitError(f"no checkpoint of {self.run_dir} can be loaded (see the warnings): resume from a "
                               "copy of a good one, or start afresh in another --out")
        _, state = resumed
        self.loader.load_state_dict(state["loader"])
        self.engine.load_state_dict(state)
        self.step_no = state["step"]
        return state.get("train_seconds", 0.0)

    @staticmethod
    def _loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return model(batch[0], targets=batch[1])  # (total, cross-entropy, z-loss)

    def _mfu(self, seconds: float) -> float:
        """Model FLOPs utilisation of a step that took `seconds`.

        The peak is measured once at start, in half a second; on a shared machine that half second can fall while
        other work holds the cores, and every step would then claim more than 100%. A step faster than the peak
        proves the measurement low: it is measured again (a few times at most, each costing half a second)."""
        achieved = self.flops_per_step / seconds
        if achieved > self.peak and self.peak_remeasures < 3:
            self.peak_remeasures += 1
            again = measure_matmul_peak(self.engine.dtype, device=self.d.device, seconds=0.5) * self.d.world_size
            self.peak = max(self.peak, again)
        return achieved / self.peak

    def step(self) -> dict | None:
        """One optimiser step on the next global batch; its metrics, or None when the batch was skipped."""
        cfg, d = self.cfg, self.d
        t0 = time.perf_counter()
        fraction = self.clock.fraction(self.clock.seconds()) if self.clock.budget else 0.0
        x, y, _ = self.loader.next_batch()  # this rank's rows of the global batch
        micro = [((xm.to(d.device), ym.to(d.device)), ym.numel()) for xm, ym in
                 zip(x.split(self.micro), y.split(self.micro), strict=True)]
        result = self.engine.train_step(micro, self._loss, self.step_no, fraction,
                                        self.log.log if self.log else None)
        if result.skipped:
            return None
        self.step_no += 1
        dt = time.perf_counter() - t0
        total, ce, z = result.losses
        return {"step": self.step_no, "loss": ce, "z_loss": z, "total_loss": total, "grad_norm": result.grad_norm,
                "lr": self.engine.lr, "tokens_per_s": cfg.batch_tokens / dt,
                "mfu": self._mfu(dt), "tokens": self.step_no * cfg.batch_tokens,
                "skipped_batches": self.engine.skipped}

    def evaluate(self, bar: tqdm) -> dict:
        """Per-language held-out loss, perplexity and bits per byte, logged."""
        # eager: under no_grad and eval() a compiled model would compile new graphs for a few forward passes
        model = self.engine.model
        val = evaluate_lm(getattr(model, "_orig_mod", model), self.corpus, self.loader.langs, self.cfg, self.d,
                          self.engine.autocast)
        if self.log:
            self.log.log({"step": self.step_no, **val})
            bar.write(f"step {self.step_no}: " + "  ".join(f"{k.split('/')[1]} ppl {v:.1f}" for k, v in val.items()
                                                         if k.endswith("/ppl")))
        return val

    def save(self, metrics: dict, train_seconds: float) -> None:
        """A training checkpoint (a plain checkpoint plus optimiser, RNG and loader state) of this step."""
        extra = {"metrics": {k: v for k, v in metrics.items() if isinstance(v, float)},
                 "train_seconds": train_seconds, "skipped_batches": self.engine.skipped}
        write = plain_weights(self.plain, self.tokenizer, {"train": asdict(self.cfg), "step": self.step_no, **extra})
        save_training_state(self.run_dir, self.step_no, self.engine.model, self.engine.optimizer, self.d,
                            self.cfg.keep_last, write, {"loader": self.loader.state_dict(), **extra,
                                                        **self.engine.state_dict()})

    def run(self) -> dict:
        """Train to the step or time budget; returns the last step's metrics."""
        cfg, clock = self.cfg, self.clock
        bar = tqdm(total=cfg.max_steps or None, initial=self.step_no, disable=not self.d.is_main, unit="step",
                   dynamic_ncols=True)
        metrics: dict = {}
        self.engine.model.train()
        while not cfg.max_steps or self.step_no < cfg.max_steps:
            got = self.step()
            if got is None:
                continue
            metrics = got
            if clock.budget and not cfg.max_steps:
                # a timed run's length in steps is an estimate, kept current so the bar's ETA means something
                bar.total = max(self.step_no + 1, round(self.step_no / clock.elapsed() * clock.budget))
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:,.0f}",
                            mfu=f"{metrics['mfu']:.0%}")
            train_seconds = clock.seconds()  # what decides the stop is what a resume continues
            out_of_time = clock.budget > 0 and train_seconds >= clock.budget
            last = self.step_no == cfg.max_steps or out_of_time
            if self.log and every(self.step_no, cfg.log_every, last):
                self.log.log(metrics)
            if every(self.step_no, cfg.eval_every, last and bool(cfg.eval_every)):
                metrics.update(self.evaluate(bar))
            if every(self.step_no, cfg.save_every, last):
                self.save(metrics, train_seconds)
            if out_of_time:
                break
        bar.close()
        self.finish()
        return metrics

    def finish(self) -> None:
        """The newest checkpoint copied to OUT/final, the loss plot drawn."""
        if self.d.is_main and self.log:
            self.log.close()
            final = latest_checkpoint(self.run_dir)
            if final:
                replace_dir_copy(final, self.run_dir / "final")
            if (self.run_dir / "metrics.jsonl").stat().st_size:
                plot_run(str(self.run_dir))


def pretrain(data: str, out: str = "runs/pretrain", train: TrainConfig = TrainConfig(), resume: bool = False,
             init_from: str = "", device: str = "") -> dict:
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
        device: cpu or cuda (under torchrun each process takes the GPU of its LOCAL_RANK); "": cuda when there
            is one
    """
    return Pretraining(train, data, out, resume, init_from, device).run()


def resumed_options(out: str, resume: bool) -> dict:
    """`palmkit pretrain --resume`: the options not typed again take the values the run in OUT was saved with
    (train_config.json); pretrain then prints the ones that differ and refuses those that would not continue
    the same run."""
    saved = resume and saved_config(out)
    return {"train": asdict(saved)} if saved else {}


pretrain.saved_defaults = resumed_options  # read by the CLI before it parses the options
