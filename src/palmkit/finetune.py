"""Fine-tuning a pretrained PaLM: sequence classification, token classification (NER) and chat.

    palmkit finetune classify --checkpoint PRE --task sentiment-en --out runs/sst
    palmkit finetune ner --checkpoint PRE --task ner-zh --out runs/ner-zh --lora-rank 8
    palmkit finetune chat --checkpoint PRE --task dialogue-en --out runs/chat

Full fine-tuning or LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685): frozen base weights plus a
trainable low-rank update B @ A on chosen projections, merged into the weights on save. Every result is a
plain checkpoint folder (`model.safetensors`, `config.json`, `tokenizer.model`) that generate, export and
serve load as usual; a classifier or tagger adds `head.safetensors` and names its `task`, `labels` and
`pooling` in config.json. Dropout 0.1 during fine-tuning follows PaLM (section 5: no dropout in
pretraining, 0.1 when fine-tuning). The folder always holds the best model so far on the validation metric,
with `metrics.jsonl` and learning-curve PNGs beside it.
"""

from __future__ import annotations

import inspect
import json
import math
import random
import shutil
import sys
import tempfile
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from palmkit.checkpoint import load_checkpoint, load_config, load_tensors, replace_dir, save_checkpoint, save_tensors
from palmkit.errors import PalmkitError
from palmkit.evaluate import entity_scores, extract_entities
from palmkit.metrics import MetricsLog, plot_curves, read_metrics
from palmkit.model import PaLM, lm_loss
from palmkit.tasks import LabelledText, TaggedSentence, TaskData, load_task, load_user_task, subsample, words_of
from palmkit.tokenizer import Tokenizer
from palmkit.train import TrainConfig, lr_factor, make_optimizer

HEAD_FILE = "head.safetensors"
LOG_FILES = ("metrics.jsonl", "learning_curve.png", "valid_metric.png")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------------------------------
# LoRA


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * B(A(dropout(x))): the base weight is frozen, A and B train."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        # B starts at zero so that training starts from exactly the pretrained function (LoRA section 4.1)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A: the plain weight that computes what this module computes (without dropout)."""
        return self.base.weight + (self.lora_B @ self.lora_A) * self.scaling


def add_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[str], dropout: float = 0.0) -> int:
    """Freeze `model` and wrap each nn.Linear named in `targets` (e.g. q_proj, v_proj) in LoRALinear."""
    unknown = set(targets) - set(PROJECTIONS)
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {', '.join(sorted(unknown))}; choose from {', '.join(PROJECTIONS)}")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha, dropout))
                wrapped += 1
    if not wrapped:
        raise ValueError(f"no projection named {', '.join(targets)} in the model")
    return wrapped


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with every LoRALinear folded into a plain `.weight`; the model is left as it is."""
    lora = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    out = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        owner = owner.removesuffix(".base")
        if owner in lora:
            if leaf == "weight":
                out[f"{owner}.weight"] = lora[owner].merged_weight().detach()
        else:
            out[key] = value
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding the merged weight (in place)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                plain = nn.Linear(child.base.in_features, child.base.out_features, bias=False,
                                  device=child.base.weight.device, dtype=child.base.weight.dtype)
                plain.weight.data.copy_(child.merged_weight().detach())
                setattr(module, name, plain)
    return model


def set_dropout(model: nn.Module, p: float) -> None:
    """Set the rate of every dropout layer (the model is built with the pretraining rate, usually 0)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p


# --------------------------------------------------------------------------------------------------
# Heads


def _linear_head(model: PaLM, n_labels: int) -> nn.Linear:
    """A head whose logits start near unit scale: the states it reads are LayerNorm outputs."""
    head = nn.Linear(model.config.d_model, n_labels, device=model.embed_tokens.weight.device)
    nn.init.normal_(head.weight, std=model.config.d_model ** -0.5)
    nn.init.zeros_(head.bias)
    return head


class SequenceClassifier(nn.Module):
    """A linear head on one vector per text: the last real token's state (default) or the mean over tokens.

    A causal model's last state is the only one that has read the whole text, which is why it is the default.
    """

    def __init__(self, model: PaLM, n_labels: int, pooling: str = "last", dropout: float = 0.1):
        super().__init__()
        if pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
        self.model, self.pooling = model, pooling
        self.dropout = nn.Dropout(dropout)
        self.head = _linear_head(model, n_labels)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_labels) for right-padded ids (B, T) with true lengths (B,)."""
        h = self.model.hidden_states(ids)  # right padding needs no mask: causality hides it
        if self.pooling == "last":
            pooled = h[torch.arange(len(ids), device=ids.device), lengths - 1]
        else:
            mask = (torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]).to(h.dtype)
            pooled = (h * mask[..., None]).sum(1) / lengths[:, None].to(h.dtype)
        return self.head(self.dropout(pooled).to(self.head.weight.dtype))  # a bf16 model keeps an fp32 head


class TokenClassifier(nn.Module):
    """A linear head on every position's state (NER tags)."""

    def __init__(self, model: PaLM, n_labels: int, dropout: float = 0.1):
        super().__init__()
        self.model = model
        self.dropout = nn.Dropout(dropout)
        self.head = _linear_head(model, n_labels)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, n_labels)."""
        return self.head(self.dropout(self.model.hidden_states(ids)).to(self.head.weight.dtype))


# --------------------------------------------------------------------------------------------------
# Encoding examples


@dataclass
class Item:
    """One encoded example: token ids and a target (a class index, or one label per position)."""

    ids: list[int]
    target: int | list[int] | None = None
    words: list[int] = field(default_factory=list)  # NER: position of each word's first piece, -1 if cut off


def encode_text(tokenizer: Tokenizer, text: str, max_len: int) -> list[int]:
    """Ids of a text to classify: truncated, then EOS, whose state sums up the text for last-token pooling."""
    return [*tokenizer.encode(text)[:max_len - 1], tokenizer.eos_id]


def align_words(tokenizer: Tokenizer, words: Sequence[str], tags: Sequence[int] | None, max_len: int,
                char_level: bool = False, echo: bool = False) -> Item:
    """Pieces of a pre-split sentence with the tag on each word's first piece and -100 on the rest.

    Words are encoded one by one (with the space that precedes them in running text, except for
    characters of Chinese or Japanese, which have none), so a piece never spans two words. echo: the
    sentence is given twice and tagged on the second copy, whose every token has read the whole sentence
    once (a causal model otherwise tags a word without seeing what follows it; Springer et al. 2024).
    """
    ids: list[int] = []
    labels: list[int] = []
    firsts: list[int] = []
    budget = max_len // 2 if echo else max_len
    for i, word in enumerate(words):
        pieces = tokenizer.encode(word if char_level or i == 0 else " " + word) or [tokenizer.sp.unk_id()]
        if len(ids) + len(pieces) > budget:
            firsts += [-1] * (len(words) - i)  # truncated: these words are predicted O
            break
        firsts.append(len(ids))
        labels += [tags[i] if tags is not None else -100] + [-100] * (len(pieces) - 1)
        ids += pieces
    if not ids:  # an empty text (or a first word longer than the context) still makes a valid input
        ids, labels = [tokenizer.eos_id], [-100]
    if echo:
        firsts = [f + len(ids) if f >= 0 else -1 for f in firsts]
        ids, labels = ids + ids, [-100] * len(ids) + labels
    return Item(ids, labels, firsts)


def chat_item(tokenizer: Tokenizer, messages: list[dict], max_len: int, template: str | None = None) -> Item:
    """Ids of a conversation in the chat template with targets on exactly the assistant replies and their
    `<|end|>` (every other position is -100). Segments are encoded separately: the template's markers are
    single pieces, so this gives the ids of encoding the whole text at once."""
    from palmkit.chat import END, chat_template

    fmt = chat_template(template)
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        full = fmt(messages[: i + 1], add_generation_prompt=False)
        if message["role"] == "assistant":
            prompt = fmt(messages[:i], add_generation_prompt=True)
            body_end = full.rindex(END) + len(END)
            segments += [(prompt[len(done):], False), (full[len(prompt):body_end], True), (full[body_end:], False)]
        else:
            segments.append((full[len(done):], False))
        done = full
    ids, mask = [tokenizer.bos_id], [False]
    for text, trained in segments:
        piece_ids = tokenizer.encode(text) if text else []
        ids += piece_ids
        mask += [trained] * len(piece_ids)
    ids, mask = ids[: max_len + 1], mask[: max_len + 1]
    # position t predicts token t+1: a target is kept where the predicted token is the assistant's
    targets = [tok if m else -100 for tok, m in zip(ids[1:], mask[1:], strict=True)]
    return Item(ids[:-1], targets)


def collate(items: Sequence[Item], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (B, T) right-padded, lengths (B,), targets (B,) or (B, T) padded with -100)."""
    ids, lengths = pad(items, pad_id)
    if isinstance(items[0].target, int):
        return ids, lengths, torch.tensor([it.target for it in items])
    targets = torch.full(ids.shape, -100, dtype=torch.long)
    for i, it in enumerate(items):
        targets[i, : len(it.target)] = torch.tensor(it.target)
    return ids, lengths, targets


def pad(items: Sequence[Item], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T) right-padded with pad_id, lengths (B,))."""
    width = max(len(it.ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    for i, it in enumerate(items):
        ids[i, : len(it.ids)] = torch.tensor(it.ids)
    return ids, torch.tensor([len(it.ids) for it in items])


def batches(items: Sequence[Item], batch_size: int, shuffle: bool = False, seed: int = 0):
    """Lists of items; without shuffling they go by length so that little is padded."""
    order = list(range(len(items)))
    if shuffle:
        random.Random(seed).shuffle(order)
    else:
        order.sort(key=lambda i: len(items[i].ids))
    for i in range(0, len(order), batch_size):
        yield [items[j] for j in order[i:i + batch_size]]


# --------------------------------------------------------------------------------------------------
# Training options and the loop


@dataclass
class FinetuneConfig:
    """Options shared by every fine-tuning command."""

    lr: float = 0.0  # 0: 3e-4 for full fine-tuning, 2e-3 for LoRA
    weight_decay: float = 0.01
    dropout: float = 0.1  # PaLM section 5: 0.1 when fine-tuning
    batch_size: int = 16
    epochs: int = 3
    warmup: float = 0.06  # fraction of the steps spent warming up linearly
    max_len: int = 128  # tokens per example (longer texts are cut)
    grad_clip: float = 1.0
    metric: str = ""  # validation metric for early stopping and the best checkpoint; "" picks the task's
    patience: int = 2  # evaluations without improvement before stopping; 0 never stops early
    eval_every: int = 0  # steps between validations; 0: once per epoch
    max_train: int = 0  # use at most this many training examples (a seeded sample); 0: all
    max_valid: int = 1000  # validate on at most this many examples
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    seed: int = 0
    log_every: int = 10

    def __post_init__(self) -> None:
        # The CLI gives lists as several values; "q_proj,v_proj" is accepted too
        self.lora_targets = [t for part in self.lora_targets for t in str(part).split(",") if t]
        self.lr = self.lr or (2e-3 if self.lora_rank else 3e-4)
        if self.batch_size < 1 or self.epochs < 1 or self.max_len < 2:
            raise ValueError("batch_size and epochs must be >= 1 and max_len >= 2")


# Validation metrics of each kind of task; the first is the default for early stopping and the best checkpoint.
METRICS = {"classify": ("accuracy", "macro_f1", "loss"), "ner": ("f1", "precision", "recall", "loss"),
           "chat": ("loss", "ppl")}


def _metric(cfg: FinetuneConfig, kind: str) -> str:
    metric = cfg.metric or METRICS[kind][0]
    if metric not in METRICS[kind]:
        raise ValueError(f"--metric {metric!r} is not one of {', '.join(METRICS[kind])} for a {kind} task")
    return metric


def _higher_is_better(metric: str) -> bool:
    return metric not in ("loss", "ppl")


class _Run:
    """The output folder: always a complete checkpoint of the best model so far, plus the logs."""

    def __init__(self, out: Path):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        for name in LOG_FILES:
            (out / name).unlink(missing_ok=True)
        self.log = MetricsLog(out, tensorboard=False)

    def save(self, module: nn.Module, model: PaLM, tokenizer: Tokenizer, extra: dict) -> None:
        """Write model (LoRA merged) and head into a staging folder with the logs, then swap it in."""
        self.log.close()
        staging = Path(tempfile.mkdtemp(dir=self.out.parent, prefix=f".{self.out.name}.", suffix=".best"))
        try:
            with torch.device("meta"):
                shell = PaLM(model.config)
            state = merged_state_dict(model)
            shell.load_state_dict(state, assign=True)
            save_checkpoint(staging / "ckpt", shell, tokenizer, extra)
            head = getattr(module, "head", None)
            if head is not None:
                save_tensors(staging / "ckpt" / HEAD_FILE, dict(head.state_dict()), metadata={"format": "pt"})
            for name in LOG_FILES:
                if (self.out / name).is_file():
                    shutil.copyfile(self.out / name, staging / "ckpt" / name)
            replace_dir(staging / "ckpt", self.out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            self.log = MetricsLog(self.out, tensorboard=False)

    def plot(self, metric: str) -> None:
        records = read_metrics(self.log.path)
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        valid = [(r["step"], r["valid/loss"]) for r in records if "valid/loss" in r]
        series = {name: ([x for x, _ in pts], [y for _, y in pts]) for name, pts in
                  (("train", train), ("valid", valid)) if pts}
        plot_curves(series, self.out / "learning_curve.png", f"{self.out.name}: loss", "loss")
        scores = [(r["step"], r[f"valid/{metric}"]) for r in records if f"valid/{metric}" in r]
        if scores and metric != "loss":
            plot_curves({f"valid {metric}": ([x for x, _ in scores], [y for _, y in scores])},
                        self.out / "valid_metric.png", f"{self.out.name}: validation {metric}", metric)


def fit(module: nn.Module, model: PaLM, tokenizer: Tokenizer, train_items: list[Item],
        validate: Callable[[], dict[str, float]], loss_fn: Callable, cfg: FinetuneConfig, out: str | Path,
        metric: str, extra: dict) -> dict:
    """Train `module` with AdamW, warm-up then cosine decay, validation with early stopping; the best
    model is saved to `out` each time the validation metric improves. Returns the best validation record."""
    run = _Run(Path(out))
    steps_per_epoch = math.ceil(len(train_items) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    opt_cfg = TrainConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=round(cfg.warmup * total),
                          max_steps=total, min_lr_ratio=0.0, optimizer="adamw")
    optimizer = make_optimizer(module, opt_cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, opt_cfg))
    params = [p for p in module.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
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
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
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


def _prepare(checkpoint: str, cfg: FinetuneConfig) -> tuple[PaLM, Tokenizer, dict]:
    torch.manual_seed(cfg.seed)
    model, tokenizer, config = load_checkpoint(checkpoint)
    if cfg.max_len > model.config.max_seq_len:
        raise ValueError(f"max_len={cfg.max_len} is longer than the model's context ({model.config.max_seq_len})")
    set_dropout(model, cfg.dropout)
    return model, tokenizer, config


def _adapt(model: PaLM, cfg: FinetuneConfig) -> None:
    if cfg.lora_rank:
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout)


def _task_data(kind: str, task: str, train_file: str, valid_file: str, test_file: str, text_field: str,
               label_field: str, seed: int) -> TaskData:
    if bool(task) == bool(train_file):
        raise PalmkitError("give either --task (a built-in task) or --train-file (your own data)")
    data = load_task(task, seed=seed) if task else load_user_task(kind, train_file, valid_file, test_file,
                                                                  text_field, label_field, seed)
    if data.kind != kind:
        raise PalmkitError(f"task {data.name} is a {data.kind} task, not {kind}")
    return data


def _require(data: TaskData, train: list, valid: list) -> None:
    if not train or not valid:
        raise PalmkitError(f"task {data.name}: {len(train)} training and {len(valid)} validation examples; "
                           "both are needed (give --valid-file, or more data)")


def _source(data: TaskData, files: dict) -> dict:
    """What config.json records about the data, so that evaluate can rebuild the same splits."""
    paths = {k: str(Path(v).resolve()) if k in ("train", "valid", "test") else v for k, v in files.items() if v}
    return {"data": data.name, "lang": data.lang, "data_files": paths}


# --------------------------------------------------------------------------------------------------
# Sequence classification


def _check_labels(data: TaskData, examples: list[LabelledText]) -> None:
    unknown = sorted({ex.label for ex in examples} - set(data.labels))
    if unknown:
        raise PalmkitError(f"label(s) {', '.join(unknown)} not among the task's labels {data.labels}")


def classify_items(tokenizer: Tokenizer, examples: Sequence[LabelledText], labels: Sequence[str],
                   max_len: int) -> list[Item]:
    """Encoded classification examples."""
    index = {label: i for i, label in enumerate(labels)}
    return [Item(encode_text(tokenizer, ex.text, max_len), index[ex.label]) for ex in examples]


def _classify_loss(module, ids, lengths, targets):
    return F.cross_entropy(module(ids, lengths), targets)


@torch.no_grad()
def predict_logits(module: nn.Module, items: Sequence[Item], pad_id: int, batch_size: int = 32,
                   ) -> list[torch.Tensor]:
    """Logits of each item in input order (per text for classifiers, per position for taggers)."""
    out: list[torch.Tensor | None] = [None] * len(items)
    position = {id(it): i for i, it in enumerate(items)}
    for batch in batches(items, batch_size):
        ids, lengths = pad(batch, pad_id)
        logits = module(ids, lengths).float()
        for it, row, n in zip(batch, logits, lengths.tolist(), strict=True):
            out[position[id(it)]] = row if row.dim() == 1 else row[:n]
    return out  # type: ignore[return-value]


def classification_scores(y_true: Sequence[int], y_pred: Sequence[int], n_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 (scikit-learn's definitions)."""
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro", labels=list(range(n_labels)),
                                       zero_division=0))}


def finetune_classify(checkpoint: str, out: str, task: str = "", train_file: str = "", valid_file: str = "",
                      test_file: str = "", text_field: str = "text", label_field: str = "label",
                      pooling: Literal["last", "mean"] = "last", **options) -> dict:
    """Fine-tune a sequence classifier (a linear head on the pretrained model); returns the best validation scores."""
    cfg = FinetuneConfig(**options)
    data = _task_data("classify", task, train_file, valid_file, test_file, text_field, label_field, cfg.seed)
    _check_labels(data, data.train + data.valid)
    model, tokenizer, _ = _prepare(checkpoint, cfg)
    _adapt(model, cfg)
    module = SequenceClassifier(model, len(data.labels), pooling, cfg.dropout)
    train = classify_items(tokenizer, subsample(data.train, cfg.max_train, cfg.seed), data.labels, cfg.max_len)
    valid_ex = subsample(data.valid, cfg.max_valid, cfg.seed)
    valid = classify_items(tokenizer, valid_ex, data.labels, cfg.max_len)
    _require(data, train, valid)

    def validate() -> dict[str, float]:
        logits = torch.stack(predict_logits(module, valid, tokenizer.pad_id, cfg.batch_size * 2))
        y = torch.tensor([it.target for it in valid])
        return {"loss": F.cross_entropy(logits, y).item(),
                **classification_scores(y.tolist(), logits.argmax(-1).tolist(), len(data.labels))}

    extra = {"task": "classify", "labels": data.labels, "pooling": pooling, "max_len": cfg.max_len,
             **_source(data, {"train": train_file, "valid": valid_file, "test": test_file,
                              "text_field": text_field, "label_field": label_field})}
    return fit(module, model, tokenizer, train, validate, _classify_loss, cfg, out, _metric(cfg, "classify"), extra)


# --------------------------------------------------------------------------------------------------
# Token classification (NER)


def ner_items(tokenizer: Tokenizer, sentences: Sequence[TaggedSentence], labels: Sequence[str], max_len: int,
              char_level: bool, echo: bool = False) -> list[Item]:
    """Encoded NER sentences (tags on first pieces)."""
    index = {label: i for i, label in enumerate(labels)}
    return [align_words(tokenizer, s.tokens, [index[t] for t in s.tags], max_len, char_level, echo)
            for s in sentences]


def word_tags(logits: Sequence[torch.Tensor], items: Sequence[Item], labels: Sequence[str]) -> list[list[str]]:
    """The predicted tag of each word (its first piece's argmax; O for words cut off by truncation)."""
    out = []
    for row, it in zip(logits, items, strict=True):
        best = row.argmax(-1).tolist()
        out.append([labels[best[f]] if f >= 0 else "O" for f in it.words])
    return out


def _token_loss(module, ids, lengths, targets):
    logits = module(ids, lengths)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


def finetune_ner(checkpoint: str, out: str, task: str = "", train_file: str = "", valid_file: str = "",
                 test_file: str = "", label_field: str = "tags", char_level: bool = False,
                 context: Literal["causal", "echo"] = "causal", **options) -> dict:
    """Fine-tune a BIO tagger (a linear head on every token); returns the best validation scores.

    User files: CoNLL (word and tag columns) or JSONL {"tokens": [...], "tags": [...]}; --char-level for
    scripts without spaces. --context echo feeds each sentence twice so that every tag sees the whole sentence.
    """
    cfg = FinetuneConfig(**options)
    data = _task_data("ner", task, train_file, valid_file, test_file, "text", label_field, cfg.seed)
    char_level = data.char_level or char_level
    echo = context == "echo"
    model, tokenizer, _ = _prepare(checkpoint, cfg)
    _adapt(model, cfg)
    module = TokenClassifier(model, len(data.labels), cfg.dropout)
    train = ner_items(tokenizer, subsample(data.train, cfg.max_train, cfg.seed), data.labels, cfg.max_len,
                      char_level, echo)
    valid_ex = subsample(data.valid, cfg.max_valid, cfg.seed)
    valid = ner_items(tokenizer, valid_ex, data.labels, cfg.max_len, char_level, echo)
    _require(data, train, valid)

    def validate() -> dict[str, float]:
        logits = predict_logits(module, valid, tokenizer.pad_id, cfg.batch_size * 2)
        flat = torch.cat(logits)
        targets = torch.tensor([t for it in valid for t in it.target])
        scores = entity_scores([s.tags for s in valid_ex], word_tags(logits, valid, data.labels))["micro"]
        return {"loss": F.cross_entropy(flat, targets, ignore_index=-100).item(), "f1": scores["f1"],
                "precision": scores["precision"], "recall": scores["recall"]}

    extra = {"task": "ner", "labels": data.labels, "char_level": char_level, "context": context,
             "max_len": cfg.max_len, **_source(data, {"train": train_file, "valid": valid_file, "test": test_file,
                                                      "label_field": label_field})}
    return fit(module, model, tokenizer, train, validate, _token_loss, cfg, out, _metric(cfg, "ner"), extra)


# --------------------------------------------------------------------------------------------------
# Chat (supervised fine-tuning on conversations)


def _lm_loss(module, ids, lengths, targets):
    return lm_loss(module(ids), targets, module.config.z_loss)[0]


def finetune_chat(checkpoint: str, out: str, task: str = "", train_file: str = "", valid_file: str = "",
                  **options) -> dict:
    """Supervised fine-tuning on conversations in the chat template, with the loss on the assistant's
    replies only; the result is a plain checkpoint (generate, serve, export). User files: JSONL
    {"messages": [{"role", "content"}, ...]}."""
    cfg = FinetuneConfig(**options)
    data = _task_data("chat", task, train_file, valid_file, "", "text", "label", cfg.seed)
    model, tokenizer, config = _prepare(checkpoint, cfg)
    _adapt(model, cfg)
    template = config.get("chat_template")

    def encode(conversations: list) -> list[Item]:
        items = [chat_item(tokenizer, c, cfg.max_len, template) for c in conversations]
        return [it for it in items if any(t != -100 for t in it.target)]  # cut before any reply: nothing to learn

    train = encode(subsample(data.train, cfg.max_train, cfg.seed))
    valid = encode(subsample(data.valid, cfg.max_valid, cfg.seed))
    _require(data, train, valid)

    @torch.no_grad()
    def validate() -> dict[str, float]:
        total = count = 0.0
        for batch in batches(valid, cfg.batch_size * 2):
            ids, _, targets = collate(batch, tokenizer.pad_id)
            ce = lm_loss(model(ids), targets, 0.0)[1]
            n = int((targets != -100).sum())
            total, count = total + ce.item() * n, count + n
        loss = total / max(count, 1)
        return {"loss": loss, "ppl": math.exp(min(loss, 50))}

    extra = {"task": "chat", "max_len": cfg.max_len,
             **_source(data, {"train": train_file, "valid": valid_file})}
    if template:
        extra["chat_template"] = template
    return fit(model, model, tokenizer, train, validate, _lm_loss, cfg, out, _metric(cfg, "chat"), extra)


# --------------------------------------------------------------------------------------------------
# Inference: classifiers and taggers loaded from their folders


def _load_head(path: Path, kind: str, model: PaLM | None, tokenizer: Tokenizer | None,
               device: str) -> tuple[PaLM, Tokenizer, dict, dict]:
    """(model, tokenizer, config, head weights) of a fine-tuned folder of the given kind."""
    config = load_config(path)
    if config.get("task") != kind:
        raise PalmkitError(f"{path} is not a {kind} checkpoint (config.json task: {config.get('task')!r})")
    if model is None or tokenizer is None:
        model, tokenizer, config = load_checkpoint(path, device)
    head = load_tensors(path / HEAD_FILE)
    return model, tokenizer, config, head


class Classifier:
    """A fine-tuned text classifier: `predict(texts)` -> [(label, {label: probability})]."""

    def __init__(self, module: SequenceClassifier, tokenizer: Tokenizer, labels: list[str], max_len: int):
        self.module, self.tokenizer, self.labels, self.max_len = module.eval(), tokenizer, labels, max_len

    def predict_proba(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Class probabilities (N, n_labels), columns in the order of `labels`."""
        items = [Item(encode_text(self.tokenizer, t, self.max_len)) for t in texts]
        if not items:
            return torch.empty(0, len(self.labels))
        return torch.stack(predict_logits(self.module, items, self.tokenizer.pad_id, batch_size)).softmax(-1)

    def predict(self, texts: Sequence[str], batch_size: int = 32) -> list[tuple[str, dict[str, float]]]:
        """The most probable label of each text and the probability of every label."""
        probs = self.predict_proba(texts, batch_size)
        return [(self.labels[int(row.argmax())], {lab: float(p) for lab, p in zip(self.labels, row, strict=True)})
                for row in probs]


def load_classifier(path: str | Path, device: str = "cpu", model: PaLM | None = None,
                    tokenizer: Tokenizer | None = None) -> Classifier:
    """A Classifier from a `finetune classify` folder. A server that already holds the folder's model passes
    it (and its tokenizer) to share the weights; the head is small and loaded here."""
    path = Path(path)
    model, tokenizer, config, head = _load_head(path, "classify", model, tokenizer, device)
    module = SequenceClassifier(model, len(config["labels"]), config.get("pooling", "last"), 0.0)
    module.head.load_state_dict(head)
    module.head.to(model.embed_tokens.weight.device)
    return Classifier(module, tokenizer, list(config["labels"]), int(config.get("max_len", model.config.max_seq_len)))


class Tagger:
    """A fine-tuned BIO tagger: `tag(texts)` -> entities with character offsets."""

    def __init__(self, module: TokenClassifier, tokenizer: Tokenizer, labels: list[str], max_len: int,
                 char_level: bool, echo: bool):
        self.module, self.tokenizer, self.labels = module.eval(), tokenizer, labels
        self.max_len, self.char_level, self.echo = max_len, char_level, echo

    def tag_words(self, sentences: Sequence[Sequence[str]], batch_size: int = 32) -> list[list[str]]:
        """The tag of each word of pre-split sentences."""
        items = [align_words(self.tokenizer, s, None, self.max_len, self.char_level, self.echo) for s in sentences]
        if not items:
            return []
        logits = predict_logits(self.module, items, self.tokenizer.pad_id, batch_size)
        return word_tags(logits, items, self.labels)

    def tag(self, texts: Sequence[str]) -> list[list[dict]]:
        """Entities of raw texts: [{"text", "type", "start", "end"}] with character offsets into the text."""
        split = [words_of(t, self.char_level) for t in texts]
        tags = self.tag_words([[w for w, _ in ws] for ws in split])
        out = []
        for text, ws, ts in zip(texts, split, tags, strict=True):
            ents = []
            for etype, first, last in extract_entities(ts):
                start, end = ws[first][1], ws[last][1] + len(ws[last][0])
                ents.append({"text": text[start:end], "type": etype, "start": start, "end": end})
            out.append(ents)
        return out


def load_tagger(path: str | Path, device: str = "cpu") -> Tagger:
    """A Tagger from a `finetune ner` folder."""
    path = Path(path)
    model, tokenizer, config, head = _load_head(path, "ner", None, None, device)
    module = TokenClassifier(model, len(config["labels"]), 0.0)
    module.head.load_state_dict(head)
    module.head.to(model.embed_tokens.weight.device)
    return Tagger(module, tokenizer, list(config["labels"]), int(config.get("max_len", model.config.max_seq_len)),
                  bool(config.get("char_level")), config.get("context") == "echo")


# --------------------------------------------------------------------------------------------------
# CLI


def classify_command(checkpoint: str, texts: list[str], batch_size: int = 32) -> str:
    """Classify texts with a fine-tuned classifier: one line per text, label, probability and text."""
    clf = load_classifier(checkpoint)
    rows = clf.predict(texts, batch_size)
    return "\n".join(f"{label}\t{probs[label]:.3f}\t{text}" for text, (label, probs) in zip(texts, rows, strict=True))


classify_command.__cli_positional__ = ("texts",)


def tag_command(checkpoint: str, texts: list[str], json_output: bool = False) -> str:
    """Find named entities with a fine-tuned tagger: each text with its entities as [TYPE text]."""
    tagger = load_tagger(checkpoint)
    results = tagger.tag(texts)
    if json_output:
        return "\n".join(json.dumps({"text": t, "entities": e}, ensure_ascii=False) for t, e in zip(texts, results,
                                                                                                     strict=True))
    lines = []
    for text, ents in zip(texts, results, strict=True):
        marked, pos = [], 0
        for e in ents:
            marked += [text[pos:e["start"]], f"[{e['type']} {e['text']}]"]
            pos = e["end"]
        lines.append("".join([*marked, text[pos:]]))
    return "\n".join(lines)


tag_command.__cli_positional__ = ("texts",)


OPTIONS_HELP = """Training options: --lr (0: 3e-4 for full fine-tuning, 2e-3 for LoRA), --weight-decay, --dropout,
--batch-size, --epochs, --warmup (fraction of the steps), --max-len (tokens per example), --metric (what early
stopping and the kept checkpoint follow: accuracy or macro_f1 for classify, f1 for ner, loss for chat),
--patience (validations without improvement before stopping; 0: never), --eval-every (steps; 0: every epoch),
--max-train / --max-valid (a seeded subsample), --lora-rank (0: full fine-tuning), --lora-alpha, --lora-dropout,
--lora-targets (of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj; several or comma-separated).
OUT ends up holding the best checkpoint, metrics.jsonl, learning_curve.png and valid_metric.png."""


def _with_options(fn: Callable) -> inspect.Signature:
    """`fn`'s own parameters followed by FinetuneConfig's fields as keyword options (for the CLI)."""
    own_hints = typing.get_type_hints(fn)
    own = [p.replace(annotation=own_hints.get(p.name, p.annotation))
           for p in inspect.signature(fn).parameters.values() if p.kind != p.VAR_KEYWORD]
    hints = typing.get_type_hints(FinetuneConfig)
    defaults = FinetuneConfig()
    extra = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=getattr(defaults, f.name),
                               annotation=hints[f.name]) for f in fields(FinetuneConfig)]
    if defaults.lr:  # the CLI shows 0 (automatic) rather than the resolved full-fine-tuning rate
        extra[0] = extra[0].replace(default=0.0)
    return inspect.Signature([*own, *extra])


def _command(fn: Callable) -> Callable:
    def command(**kwargs) -> str:
        return json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in fn(**kwargs).items()},
                          indent=1)

    command.__doc__ = f"{inspect.getdoc(fn)}\n\n{OPTIONS_HELP}"
    command.__signature__ = _with_options(fn)
    command.__name__ = fn.__name__ + "_command"
    return command


finetune_classify_command = _command(finetune_classify)
finetune_ner_command = _command(finetune_ner)
finetune_chat_command = _command(finetune_chat)
