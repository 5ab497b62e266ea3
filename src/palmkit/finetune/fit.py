"""The fine-tuning loop: AdamW, warm-up, dropout, evaluation, early stopping, the best checkpoint kept.

Dropout 0.1 during fine-tuning follows PaLM (section 5: no dropout in pretraining, 0.1 when fine-tuning). The
output folder always holds the best model so far on the validation metric, with `metrics.jsonl`, TensorBoard
events (`tensorboard/`, as in pretraining) and learning-curve PNGs beside it. A LoRA chat model also gets its
adapters alone in PEFT's format (`adapter/`), for the base model as `palmkit export` writes it.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from tqdm import tqdm

from palmkit.data.tasks import TaskData, load_task, load_user_task, subsample
from palmkit.errors import PalmkitError
from palmkit.finetune.encode import Item, batches, collate
from palmkit.finetune.heads import HEAD_FILE
from palmkit.io import atomic_copy, check_destination, claim_names, save_tensors, split_list, staged_dir
from palmkit.model.checkpoint import CHECKPOINT_FILES, load_checkpoint, write_checkpoint
from palmkit.model.lora import LoRALinear, add_lora, merged_state_dict, write_peft_adapter
from palmkit.model.palm import PaLM
from palmkit.model.tokenizer import Tokenizer
from palmkit.train.metrics import MetricsLog, plot_curves, read_metrics
from palmkit.train.step import lr_factor, make_optimizer, optimizer_step

LOG_FILES = ("metrics.jsonl", "learning_curve.png", "valid_metric.png")
LOG_DIRS = ("tensorboard",)
ADAPTER_DIR = "adapter"  # a LoRA chat model's adapters in PEFT's format
EVAL_DIR = "eval"  # `palmkit evaluate`'s default report folder, inside the model's folder
# an existing OUT is replaced only when it holds these
FINETUNE_FILES = CHECKPOINT_FILES | {HEAD_FILE, ADAPTER_DIR, EVAL_DIR, *LOG_FILES, *LOG_DIRS}


def set_dropout(model: nn.Module, p: float) -> None:
    """Set the rate of every dropout layer (the model is built with the pretraining rate, usually 0)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p


@dataclass(frozen=True)
class FinetuneConfig:
    """Options shared by every fine-tuning command (saved in the checkpoint's config.json)."""

    lr: float = 0.0
    """peak learning rate; 0: automatic, 3e-4 for full fine-tuning and 2e-3 for LoRA"""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay, on 2-D weights only"""
    dropout: float = 0.1
    """dropout rate while fine-tuning (PaLM section 5: 0.1, where pretraining has none)"""
    batch_size: int = 16
    """examples per step"""
    epochs: int = 3
    """passes over the training examples"""
    warmup: float = 0.06
    """share of the steps spent warming up linearly"""
    max_len: int = 128
    """tokens per example (longer texts are cut)"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this"""
    metric: str = ""
    """validation metric that early stopping and the kept checkpoint follow: accuracy or macro_f1 (classify), f1,
    precision or recall (ner), loss or ppl (chat); "": the first of these for the task"""
    patience: int = 2
    """validations without improvement before stopping; 0: never stop early"""
    eval_every: int = 0
    """steps between validations; 0: once per epoch"""
    max_train: int = 0
    """train on at most this many examples (a seeded sample); 0: all"""
    max_valid: int = 1000
    """validate on at most this many examples (a seeded sample)"""
    lora_rank: int = 0
    """rank of the LoRA adapters; 0: full fine-tuning"""
    lora_alpha: float = 16.0
    """LoRA scaling: the adapter's update is multiplied by lora_alpha / lora_rank"""
    lora_dropout: float = 0.05
    """dropout on the LoRA adapters' input"""
    lora_targets: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    """projections that get adapters, of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj: a list,
    or one comma-separated string"""
    seed: int = 0
    """seed of the head's initial weights, the data order and the subsamples"""
    log_every: int = 10
    """steps between training lines of OUT/metrics.jsonl"""

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_targets", split_list(self.lora_targets))
        if self.batch_size < 1 or self.epochs < 1 or self.max_len < 2:
            raise PalmkitError("batch_size and epochs must be >= 1 and max_len >= 2")

    @property
    def peak_lr(self) -> float:
        """`lr`, or when it is 0 the rate that suits the method: LoRA's few new weights take a larger one."""
        return self.lr or (2e-3 if self.lora_rank else 3e-4)


# Validation metrics of each kind of task; the first is the default for early stopping and the best checkpoint.
METRICS = {"classify": ("accuracy", "macro_f1", "loss"), "ner": ("f1", "precision", "recall", "loss"),
           "chat": ("loss", "ppl")}


def metric_name(cfg: FinetuneConfig, kind: str) -> str:
    metric = cfg.metric or METRICS[kind][0]
    if metric not in METRICS[kind]:
        raise PalmkitError(f"--train.metric {metric!r} is not one of {', '.join(METRICS[kind])} for a {kind} task")
    return metric


def _higher_is_better(metric: str) -> bool:
    return metric not in ("loss", "ppl")


class _Run:
    """The output folder: always a complete checkpoint of the best model so far, plus the logs."""

    def __init__(self, out: Path, force: bool = False):
        check_destination(out, FINETUNE_FILES, force)  # before the first log line is written there
        self.out, self.force = out, force
        claim_names(out, [*LOG_FILES, *LOG_DIRS])  # written in place: the folder's manifest lists them first
        for name in LOG_FILES:
            (out / name).unlink(missing_ok=True)
        for name in LOG_DIRS:
            shutil.rmtree(out / name, ignore_errors=True)
        self.log = MetricsLog(out)

    def save(self, module: nn.Module, model: PaLM, tokenizer: Tokenizer, extra: dict) -> None:
        """Write model (LoRA merged) and head into a staging folder with the logs, then swap it in."""
        self.log.close()
        try:
            with staged_dir(self.out, FINETUNE_FILES, self.force) as staging:
                with torch.device("meta"):
                    shell = PaLM(model.config)
                state = merged_state_dict(model)
                shell.load_state_dict(state, assign=True)
                write_checkpoint(staging, shell, tokenizer, extra)
                head = getattr(module, "head", None)
                if head is not None:
                    save_tensors(staging / HEAD_FILE, dict(head.state_dict()), metadata={"format": "pt"})
                elif any(isinstance(m, LoRALinear) for m in model.modules()):
                    write_peft_adapter(staging / ADAPTER_DIR, model)
                for name in LOG_FILES:
                    if (self.out / name).is_file():
                        atomic_copy(self.out / name, staging / name)
                for name in LOG_DIRS:
                    if (self.out / name).is_dir():
                        shutil.copytree(self.out / name, staging / name)
        finally:
            self.log = MetricsLog(self.out)

    def plot(self, metric: str) -> None:
        records = read_metrics(self.log.path)
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        valid = [(r["step"], r["valid/loss"]) for r in records if "valid/loss" in r]
        series = {name: ([x for x, _ in pts], [y for _, y in pts]) for name, pts in
                  (("train", train), ("valid", valid)) if pts}
        claim_names(self.out, ["learning_curve.png", "valid_metric.png"])  # the swap may have left them out
        plot_curves(series, self.out / "learning_curve.png", f"{self.out.name}: loss", "loss")
        scores = [(r["step"], r[f"valid/{metric}"]) for r in records if f"valid/{metric}" in r]
        if scores and metric != "loss":
            plot_curves({f"valid {metric}": ([x for x, _ in scores], [y for _, y in scores])},
                        self.out / "valid_metric.png", f"{self.out.name}: validation {metric}", metric)


def fit(module: nn.Module, model: PaLM, tokenizer: Tokenizer, train_items: list[Item],
        validate: Callable[[], dict[str, float]], loss_fn: Callable, cfg: FinetuneConfig, out: str | Path,
        metric: str, extra: dict, force: bool = False) -> dict:
    """Train `module` with AdamW, warm-up then cosine decay, validation with early stopping; the best
    model is saved to `out` each time the validation metric improves. Returns the best validation record.

    An `out` that holds files palmkit does not write there is refused before training, or with `force` updated in
    place: palmkit's files replaced, the others kept (palmkit.io.staged_dir)."""
    run = _Run(Path(out), force)
    steps_per_epoch = math.ceil(len(train_items) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    optimizer = make_optimizer(module, cfg.peak_lr, cfg.weight_decay)
    warmup = round(cfg.warmup * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total))
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    run.log.log({"event": "start", "examples": len(train_items), "steps": total, "trainable_params": trainable,
                 "total_params": sum(p.numel() for p in module.parameters())})
    best: dict = {}
    bad, step, stop = 0, 0, False
    eval_every = cfg.eval_every or steps_per_epoch
    sign = 1 if _higher_is_better(metric) else -1
    bar = tqdm(total=total, unit="step", dynamic_ncols=True, desc=f"finetune {Path(out).name}")
    started = time.perf_counter()
    for epoch in range(cfg.epochs):
        module.train()
        t0, seen = time.perf_counter(), 0
        window: list[float] = []  # training losses since the last log record
        for batch in batches(train_items, cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch):
            ids, lengths, targets = collate(batch, tokenizer.pad_id)
            loss = loss_fn(module, ids, lengths, targets)
            loss.backward()
            optimizer_step(module, optimizer, cfg.grad_clip)
            scheduler.step()
            step += 1
            seen += len(batch)
            window.append(loss.item())
            speed = seen / (time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{window[-1]:.4f}", ex_s=f"{speed:.1f}")
            evaluating = step % eval_every == 0 or step == total
            if step % cfg.log_every == 0 or evaluating:
                run.log.log({"step": step, "epoch": round(step / steps_per_epoch, 3), "loss": sum(window) / len(window),
                             "lr": optimizer.param_groups[0]["lr"], "examples_per_s": speed})
                window = []
            if evaluating:
                module.eval()
                scores = validate()
                module.train()
                record = {"step": step, "epoch": round(step / steps_per_epoch, 3),
                          **{f"valid/{k}": v for k, v in scores.items()}}
                improved = not best or sign * scores[metric] > sign * best[f"valid/{metric}"]
                tqdm.write(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items())
                           + ("  (best)" if improved else ""), file=sys.stderr)
                run.log.log(record)
                if improved:
                    best, bad = record, 0
                    run.save(module, model, tokenizer, {**extra, "best": best,
                                                        "finetune": {**asdict(cfg), "metric": metric}})
                else:
                    bad += 1
                    stop = bool(cfg.patience) and bad >= cfg.patience
                if stop:
                    run.log.log({"step": step, "event": f"early stop: no better {metric} for {bad} evaluations"})
                    tqdm.write(f"early stop at step {step}: best {metric} {best[f'valid/{metric}']:.4f} "
                               f"at step {best['step']}", file=sys.stderr)
                    break
        if stop:
            break
    bar.close()
    run.log.log({"event": "done", "steps": step, "seconds": round(time.perf_counter() - started, 2),
                 "best_step": best.get("step")})
    run.log.close()
    run.plot(metric)
    return {**best, "seconds": round(time.perf_counter() - started, 2), "steps": step, "trainable_params": trainable}


class Job(NamedTuple):
    """What every fine-tuning command starts from."""

    data: TaskData
    model: PaLM
    tokenizer: Tokenizer
    config: dict  # the pretrained checkpoint's config.json
    source: dict  # what the tuned checkpoint's config.json records about the data


def start(kind: str, checkpoint: str, cfg: FinetuneConfig, task: str, files: dict[str, str]) -> Job:
    """The task's data (a built-in `task`, or the user's `files`: train, valid, test, text_field, label_field,
    label_names) and the pretrained model prepared for fine-tuning."""
    data = task_data(kind, task, files.get("train", ""), files.get("valid", ""), files.get("test", ""),
                     files.get("text_field", "text"), files.get("label_field", "label"), cfg.seed,
                     files.get("label_names", ""))
    model, tokenizer, config = prepare(checkpoint, cfg)
    return Job(data, model, tokenizer, config, data_source(data, files))


def encode_splits(data: TaskData, cfg: FinetuneConfig, encode: Callable[[list], list[Item]]
                  ) -> tuple[list[Item], list[Item], list]:
    """(training items, validation items, validation examples): seeded subsamples of at most cfg.max_train and
    cfg.max_valid examples, encoded; a task left with no training or no validation item is an error."""
    valid_examples = subsample(data.valid, cfg.max_valid, cfg.seed)
    train, valid = encode(subsample(data.train, cfg.max_train, cfg.seed)), encode(valid_examples)
    if not train or not valid:
        raise PalmkitError(f"task {data.name}: {len(train)} training and {len(valid)} validation examples; "
                           "both are needed (give --valid_file, or more data)")
    return train, valid, valid_examples


def prepare(checkpoint: str, cfg: FinetuneConfig) -> tuple[PaLM, Tokenizer, dict]:
    """(model, tokenizer, config) of the pretrained checkpoint, set up for fine-tuning: dropout on, LoRA adapters
    added when cfg.lora_rank asks for them (heads are added after, so they stay fully trainable)."""
    torch.manual_seed(cfg.seed)
    model, tokenizer, config = load_checkpoint(checkpoint)
    if cfg.max_len > model.config.max_seq_len:
        raise PalmkitError(f"max_len={cfg.max_len} is longer than the model's context ({model.config.max_seq_len})")
    set_dropout(model, cfg.dropout)
    if cfg.lora_rank:
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout)
    return model, tokenizer, config


def task_data(kind: str, task: str, train_file: str, valid_file: str, test_file: str, text_field: str,
               label_field: str, seed: int, label_names: list[str] | str = "") -> TaskData:
    if bool(task) == bool(train_file):
        raise PalmkitError("give either --task (a built-in task) or --train_file (your own data)")
    data = load_task(task, seed=seed) if task else load_user_task(kind, train_file, valid_file, test_file,
                                                                  text_field, label_field, seed,
                                                                  label_names=label_names)
    if data.kind != kind:
        raise PalmkitError(f"task {data.name} is a {data.kind} task, not {kind}")
    return data


def data_source(data: TaskData, files: dict) -> dict:
    """What config.json records about the data, so that evaluate can rebuild the same splits."""
    paths = {k: str(Path(v).resolve()) if k in ("train", "valid", "test") else v for k, v in files.items() if v}
    return {"data": data.name, "lang": data.lang, "data_files": paths}
