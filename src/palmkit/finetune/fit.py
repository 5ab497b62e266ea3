"""The fine-tuning loop: AdamW, warm-up, dropout, evaluation, early stopping, the best checkpoint kept.

Dropout 0.1 during fine-tuning follows PaLM (section 5: no dropout in pretraining, 0.1 when fine-tuning). The
output folder always holds the best model so far on the validation metric, with `metrics.jsonl`, TensorBoard
events (`tensorboard/`, as in pretraining) and learning-curve PNGs beside it. A LoRA chat model also gets its
adapters alone in PEFT's format (`adapter/`), for the base model as `palmkit export` writes it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm import tqdm

from palmkit.data.tasks import TaskData, TaskFiles, subsample
from palmkit.errors import PalmkitError
from palmkit.finetune.encode import Item, batches, collate
from palmkit.finetune.heads import HEAD_FILE
from palmkit.io import (
    atomic_copy,
    atomic_write_bytes,
    check_destination,
    claim_names,
    load_tensors,
    remove_stale_staging,
    save_tensors,
    split_list,
    staged_dir,
)
from palmkit.model.checkpoint import CHECKPOINT_FILES, load_checkpoint, write_checkpoint
from palmkit.model.lora import LoRALinear, add_lora, merged_state_dict, write_peft_adapter
from palmkit.model.palm import PaLM
from palmkit.model.tokenizer import Tokenizer
from palmkit.train.config import engine_config
from palmkit.train.distributed import all_reduce, gather_objects, init_distributed
from palmkit.train.engine import Engine, LRSchedule, every, rank_share
from palmkit.train.metrics import MetricsLog, plot_curves, read_metrics
from palmkit.train.state import (
    OPTIMIZER_FILE,
    TRAINER_FILE,
    latest_checkpoint,
    resume_training_state,
    save_training_state,
)

REJECTED_FILE = "rejected.jsonl"  # records of the user's files left out (duplicates, conflicting labels)
LOG_FILES = ("metrics.jsonl", "learning_curve.png", "valid_metric.png", REJECTED_FILE)
LOG_DIRS = ("tensorboard",)
CHECKPOINTS = ("checkpoints", "latest.json")  # training state for --resume, kept across saves of the best model
MODULE_FILE = "module.safetensors"  # a training checkpoint's weights: the whole module (model, LoRA, head)
STEP_FILES = frozenset({MODULE_FILE, OPTIMIZER_FILE, TRAINER_FILE})
# Options that decide what a resumed fine-tune continues: the data order, the schedule, the trained weights
RESUME_FIXED = ("lr", "weight_decay", "dropout", "batch_size", "epochs", "warmup", "max_len", "max_train",
                "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "seed")
ADAPTER_DIR = "adapter"  # a LoRA chat model's adapters in PEFT's format
EVAL_DIR = "eval"  # `palmkit evaluate`'s default report folder, inside the model's folder
# an existing OUT is replaced only when it holds these
FINETUNE_FILES = CHECKPOINT_FILES | {HEAD_FILE, ADAPTER_DIR, EVAL_DIR, *LOG_FILES, *LOG_DIRS, *CHECKPOINTS}


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
    """examples per step, over all processes together (the same training whatever their number)"""
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
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """compute dtype: bfloat16 autocasts matmuls and attention (weights and loss stay float32); float16 the
    same with a gradient scaler, on GPUs only"""
    compile: bool = False
    """torch.compile the model (slow to start, faster per step)"""
    activation_checkpointing: bool = False
    """recompute each block's activations in the backward pass: less memory for one more forward pass"""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """data parallelism under torchrun: ddp (each process holds the model, the batch is split between them) or
    fsdp (FSDP2: each process holds a shard of the weights, gathered block by block as they are used)"""
    micro_batch: int = 0
    """examples per forward pass on each process (gradients accumulate up to batch_size); 0: all of a
    process's share of the batch at once"""
    save_every: int = 0
    """steps between training checkpoints in OUT/checkpoints (for --resume); 0: at each validation"""
    keep_last: int = 1
    """training checkpoints kept in OUT/checkpoints"""
    max_bad_steps: int = 5
    """stop after this many consecutive steps with a non-finite loss or gradient (each one is skipped)"""

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


def _link_tree(src: Path, dst: Path) -> None:
    """Copy a file or folder as hard links (instant, no second copy on disk; files are only ever replaced)."""
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=os.link)
    elif src.is_file():
        os.link(src, dst)


class _Run:
    """The output folder: always a complete checkpoint of the best model so far, plus the logs and the training
    checkpoints. Only the main process writes it."""

    def __init__(self, out: Path, force: bool, resume_step: int | None):
        check_destination(out, FINETUNE_FILES, force)  # before the first log line is written there
        self.out, self.force = out, force
        # written in place, not through the staged swap: the folder's manifest lists them before they are
        claim_names(out, [*LOG_FILES, *LOG_DIRS, *CHECKPOINTS])
        out.mkdir(parents=True, exist_ok=True)
        if resume_step is None:  # a new run: the logs and training state of an earlier one go
            for name in (*LOG_FILES, "latest.json"):
                (out / name).unlink(missing_ok=True)
            for name in (*LOG_DIRS, "checkpoints"):
                shutil.rmtree(out / name, ignore_errors=True)
        self.log = MetricsLog(out, truncate_after_step=resume_step)

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
                for name in CHECKPOINTS:
                    _link_tree(self.out / name, staging / name)
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


def _targets(targets: torch.Tensor) -> int:
    """How many targets a micro-batch's loss averages over: one per example, or the positions not -100."""
    return len(targets) if targets.dim() == 1 else int((targets != -100).sum())


def _meta_twin(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters and buffers are on the meta device: its structure, no memory."""
    memo: dict[int, object] = {}
    for t in [*module.parameters(), *module.buffers()]:
        meta = t.detach().to("meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def _aliases(module: nn.Module) -> dict[str, str]:
    """State-dict names that name a tensor already named before (a head that shares the model, as the
    recommender's two towers do) -> that first name."""
    inner = getattr(getattr(module, "_orig_mod", module), "module", module)
    first: dict[int, str] = {}
    out = {}
    for k, v in inner.state_dict(keep_vars=True).items():
        if v.data_ptr() in first:
            out[k] = first[v.data_ptr()]
        else:
            first[v.data_ptr()] = k
    return out


def _module_weights(aliases: dict[str, str]) -> Callable[[Path, dict], None]:
    """A weights writer for training checkpoints: the module's state, each shared tensor once."""
    return lambda staging, state: save_tensors(staging / MODULE_FILE,
                                               {k: v for k, v in state.items() if k not in aliases})


def _module_reader(aliases: dict[str, str]) -> Callable[[Path, nn.Module], dict]:
    """The weights of a training checkpoint, shared tensors under each of their names."""
    def read(path: Path, module: nn.Module) -> dict:
        weights = load_tensors(path / MODULE_FILE)
        return {**weights, **{k: weights[v] for k, v in aliases.items() if v in weights}}
    return read


@dataclass
class Objective:
    """What a fine-tune trains on and how it is judged."""

    items: list[Item]  # the encoded training examples
    loss: Callable  # loss(module, ids, lengths, targets) -> scalar tensor
    validate: Callable[[], dict[str, float]]  # the validation scores, the metric among them
    metric: str  # the score that picks the best model and stops early
    extra: dict  # what the tuned checkpoint's config.json records about the task
    rejected: list[dict] = field(default_factory=list)  # the user's records left out (OUT/rejected.jsonl)


@dataclass
class _Progress:
    """The loop's state that a resume restores: steps done, the best validation record, early stopping."""

    step: int = 0
    best: dict = field(default_factory=dict)
    bad: int = 0
    stopped: bool = False
    window: list[float] = field(default_factory=list)  # training losses since the last log record


class _FineTune:
    """One fine-tuning run on the training engine (palmkit.train.engine): setup, then `run` repeats `step` with
    periodic log, validation (the best model saved to OUT, early stopping) and training checkpoints."""

    def __init__(self, module: nn.Module, model: PaLM, tokenizer: Tokenizer, objective: Objective,
                 cfg: FinetuneConfig, out: Path, force: bool, resume: bool, device: str):
        self.d = d = init_distributed(device)
        self.module, self.model, self.tokenizer, self.items = module, model, tokenizer, objective.items
        self.validate, self.cfg, self.out = objective.validate, cfg, out
        self.metric, self.extra = objective.metric, objective.extra
        self.loss_fn = lambda m, batch: objective.loss(m, *batch)
        items, rejected = objective.items, objective.rejected
        self.steps_per_epoch = math.ceil(len(items) / cfg.batch_size)
        self.total = self.steps_per_epoch * cfg.epochs
        # Sharded weights are gathered for saving the best model into a twin on the main rank, built now on the
        # meta device (no memory) with the module's structure: LoRA, heads, shared towers
        sharded = cfg.strategy == "fsdp" and d.world_size > 1
        self.twin = _meta_twin(module) if sharded and d.is_main else None
        self.aliases = _aliases(module)  # before sharding: sharded tensors do not show what they share
        self.sharded = sharded
        self.engine = Engine(module, engine_config(cfg), d, cfg.peak_lr,
                             LRSchedule(round(cfg.warmup * self.total), self.total), cfg.weight_decay)
        self.sign = 1 if _higher_is_better(self.metric) else -1
        self.progress = _Progress()
        if d.is_main:
            check_destination(out, FINETUNE_FILES, force)
            remove_stale_staging(out)  # a run killed while swapping in its best model left OUT beside it
        all_reduce([0.0], d)  # the other ranks look at OUT once it is whole
        resumed = resume_training_state(out, self.engine.model, self.engine.optimizer, d,
                                        _module_reader(self.aliases)) if resume and latest_checkpoint(out) else None
        if resumed:
            self._restore(resumed[1])
        elif resume and d.is_main:
            print(f"no checkpoint in {out}: starting from scratch", file=sys.stderr)
        self.run_dir = _Run(out, force, self.progress.step if resumed else None) if d.is_main else None
        self.trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        self.log({"event": f"resume at step {self.progress.step}" if resumed else "start", "examples": len(items),
                  "steps": self.total, "trainable_params": self.trainable, "world_size": d.world_size,
                  "total_params": sum(p.numel() for p in module.parameters()), "dtype": cfg.dtype})
        if rejected and self.run_dir:
            self._report(rejected)

    def _report(self, rejected: list[dict]) -> None:
        """OUT/rejected.jsonl, a count per reason in metrics.jsonl and on stderr."""
        counts = {r: sum(x["reason"] == r for x in rejected) for r in sorted({x["reason"] for x in rejected})}
        path = self.out / REJECTED_FILE
        atomic_write_bytes(path, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rejected).encode())
        self.log({"event": "data rejected", **{f"rejected_{k}": v for k, v in counts.items()}})
        shown = ", ".join(f"{v} {k}{'s' if v > 1 else ''}" for k, v in counts.items())
        print(f"palmkit: left out of the data: {shown} (texts given two labels are left out in every copy, a "
              f"repeated text kept once): see {path}", file=sys.stderr)

    def _restore(self, state: dict) -> None:
        saved = state.get("finetune", {})
        given = asdict(self.cfg)
        differ = [f"{k} {saved[k]!r} (given {given[k]!r})" for k in RESUME_FIXED if k in saved and saved[k] != given[k]]
        if differ:
            raise PalmkitError(f"cannot resume {self.out} with other options than it was started with: "
                               f"{', '.join(differ)}; give the same options, or start afresh without --resume")
        self.engine.load_state_dict(state)
        self.progress = _Progress(**state["progress"])

    def log(self, record: dict) -> None:
        if self.run_dir:
            self.run_dir.log.log(record)

    def batches(self, epoch: int) -> list[list[Item]]:
        """The global batches of an epoch: a seeded shuffle, a pure function of (seed, epoch)."""
        return list(batches(self.items, self.cfg.batch_size, shuffle=True, seed=self.cfg.seed * 1000 + epoch))

    def micro_batches(self, batch: list[Item]) -> list[tuple[tuple, int]]:
        """This rank's micro-batches of a global batch, on the device, with their numbers of targets; a rank
        left without examples gets the batch's first with weight 0, so that it joins the gradient sync."""
        out = []
        for part in rank_share(batch, self.d, self.cfg.micro_batch or len(batch)):
            ids, lengths, targets = collate(part or batch[:1], self.tokenizer.pad_id)
            dev = self.d.device
            out.append(((ids.to(dev), lengths.to(dev), targets.to(dev)), _targets(targets) if part else 0))
        return out

    def step(self, batch: list[Item]) -> float:
        """One optimiser step on a global batch; returns its loss."""
        p = self.progress
        result = self.engine.train_step(self.micro_batches(batch), self.loss_fn, p.step, log=self.log)
        p.step += 1
        return result.losses[0]

    def evaluate(self) -> bool:
        """Validate, keep the model if it is the best so far, count evaluations without improvement; returns
        whether to stop early. Every rank validates (the same examples, the same weights); rank 0's scores
        decide, so that all ranks take the same branch."""
        p, metric = self.progress, self.metric
        self.module.eval()
        with torch.no_grad(), self.engine.autocast:
            scores = gather_objects(self.validate(), self.d)[0]
        self.module.train()
        record = {"step": p.step, "epoch": round(p.step / self.steps_per_epoch, 3),
                  **{f"valid/{k}": v for k, v in scores.items()}}
        improved = not p.best or self.sign * scores[metric] > self.sign * p.best[f"valid/{metric}"]
        if self.d.is_main:
            tqdm.write(f"step {p.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items())
                       + ("  (best)" if improved else ""), file=sys.stderr)
        self.log(record)
        if improved:
            p.best, p.bad = record, 0
            module, model = self._gathered()
            if self.run_dir:
                self.run_dir.save(module, model, self.tokenizer,
                                  {**self.extra, "best": p.best, "finetune": {**asdict(self.cfg), "metric": metric}})
        else:
            p.bad += 1
        p.stopped = bool(self.cfg.patience) and p.bad >= self.cfg.patience
        if p.stopped:
            self.log({"step": p.step, "event": f"early stop: no better {metric} for {p.bad} evaluations"})
            if self.d.is_main:
                tqdm.write(f"early stop at step {p.step}: best {metric} {p.best[f'valid/{metric}']:.4f} "
                           f"at step {p.best['step']}", file=sys.stderr)
        return p.stopped

    def _gathered(self) -> tuple[nn.Module, PaLM]:
        """(module, model) holding the full weights on the main rank: the module itself, or under FSDP its twin
        loaded with the gathered weights (every rank takes part in the gathering)."""
        if not self.sharded:
            return self.module, self.model
        full = get_model_state_dict(self.engine.model, options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))
        if self.twin is None:
            return self.module, self.model
        self.twin.load_state_dict(full, assign=True)
        return self.twin, self.twin if isinstance(self.twin, PaLM) else self.twin.model

    def save(self) -> None:
        """A training checkpoint in OUT/checkpoints: weights, optimiser, RNG and the loop's progress."""
        state = {"progress": asdict(self.progress), "finetune": asdict(self.cfg), **self.engine.state_dict()}
        save_training_state(self.out, self.progress.step, self.engine.model, self.engine.optimizer, self.d,
                            self.cfg.keep_last, _module_weights(self.aliases), state, STEP_FILES)

    def run(self) -> dict:
        """Train to the end of the last epoch or an early stop; returns the best validation record."""
        cfg, p = self.cfg, self.progress
        eval_every = cfg.eval_every or self.steps_per_epoch
        bar = tqdm(total=self.total, initial=p.step, unit="step", dynamic_ncols=True, disable=not self.d.is_main,
                   desc=f"finetune {self.out.name}")
        started = time.perf_counter()
        self.module.train()
        while p.step < self.total and not p.stopped:
            epoch, index = divmod(p.step, self.steps_per_epoch)
            batch = self.batches(epoch)[index]
            t0 = time.perf_counter()
            p.window.append(self.step(batch))
            speed = len(batch) / (time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{p.window[-1]:.4f}", ex_s=f"{speed:.1f}")
            evaluating = every(p.step, eval_every, p.step == self.total)
            if every(p.step, cfg.log_every, evaluating):
                self.log({"step": p.step, "epoch": round(p.step / self.steps_per_epoch, 3),
                          "loss": sum(p.window) / len(p.window), "lr": self.engine.lr, "examples_per_s": speed})
                p.window = []
            if evaluating:
                self.evaluate()
            if every(p.step, cfg.save_every or eval_every, evaluating or p.step == self.total):
                self.save()
        bar.close()
        seconds = round(time.perf_counter() - started, 2)
        if self.run_dir:
            self.log({"event": "done", "steps": p.step, "seconds": seconds, "best_step": p.best.get("step"),
                      "skipped_batches": self.engine.skipped})
            self.run_dir.log.close()
            self.run_dir.plot(self.metric)
        return {**p.best, "seconds": seconds, "steps": p.step, "trainable_params": self.trainable}


def fit(module: nn.Module, model: PaLM, tokenizer: Tokenizer, objective: Objective, cfg: FinetuneConfig,
        out: str | Path, force: bool = False, resume: bool = False, device: str = "") -> dict:
    """Train `module` on `objective` with AdamW, warm-up then cosine decay, validation with early stopping; the
    best model is saved to `out` each time the validation metric improves. Returns the best validation record.

    Runs on the training engine: on `device`, in cfg.dtype, over the processes torchrun started (each takes its
    share of every batch; the main one writes). Training checkpoints in OUT/checkpoints let `resume` continue
    exactly where a stopped run was. An `out` that holds files palmkit does not write there is refused before
    training, or with `force` updated in place: palmkit's files replaced, the others kept
    (palmkit.io.staged_dir). The objective's rejected records are written to OUT/rejected.jsonl and counted in
    the log and metrics."""
    return _FineTune(module, model, tokenizer, objective, cfg, Path(out), force, resume, device).run()


class Job(NamedTuple):
    """What every fine-tuning command starts from."""

    data: TaskData
    model: PaLM
    tokenizer: Tokenizer
    config: dict  # the pretrained checkpoint's config.json
    source: dict  # what the tuned checkpoint's config.json records about the data


def start(kind: str, checkpoint: str, cfg: FinetuneConfig, files: TaskFiles, device: str = "") -> Job:
    """The task's data (a built-in task or the user's files) and the pretrained model prepared for fine-tuning,
    on `device` ("": cuda when there is one)."""
    data = files.load(kind, cfg.seed)
    model, tokenizer, config = prepare(checkpoint, cfg, device)
    return Job(data, model, tokenizer, config, {"data": data.name, "lang": data.lang, "data_files": files.record()})


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


def prepare(checkpoint: str, cfg: FinetuneConfig, device: str = "") -> tuple[PaLM, Tokenizer, dict]:
    """(model, tokenizer, config) of the pretrained checkpoint, set up for fine-tuning: dropout on, LoRA adapters
    added when cfg.lora_rank asks for them (heads are added after, so they stay fully trainable). The weights are
    read straight onto this process's device (torchrun: its GPU)."""
    torch.manual_seed(cfg.seed)
    model, tokenizer, config = load_checkpoint(checkpoint, init_distributed(device).device)
    if cfg.max_len > model.config.max_seq_len:
        raise PalmkitError(f"max_len={cfg.max_len} is longer than the model's context ({model.config.max_seq_len})")
    set_dropout(model, cfg.dropout)
    if cfg.lora_rank:
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout)
    return model, tokenizer, config
