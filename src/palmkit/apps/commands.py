"""The CLI's commands: thin wrappers that turn API results into text for the terminal."""

from __future__ import annotations

import inspect
import json
import os
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Literal

import torch

from palmkit.errors import PalmkitError
from palmkit.finetune.chat import finetune_chat
from palmkit.finetune.classify import finetune_classify
from palmkit.finetune.evaluate import evaluate, render_markdown
from palmkit.finetune.fit import FinetuneConfig
from palmkit.finetune.ner import finetune_ner
from palmkit.finetune.predict import load_classifier, load_tagger
from palmkit.infer.generate import stream_to
from palmkit.infer.sampling import SamplingParams
from palmkit.model.checkpoint import MODEL_FILE, load_checkpoint, save_checkpoint
from palmkit.model.layouts import saved_layout
from palmkit.model.low_rank import low_rank
from palmkit.model.palm import build_model, preset
from palmkit.model.quant import quantize_int8
from palmkit.train.config import TrainConfig
from palmkit.train.heal import heal
from palmkit.train.pretrain import pretrain

_preset = preset  # `describe` takes a parameter of that name


def describe(preset: str = "small", vocab_size: int = 0, seq_len: int = 0) -> str:
    """Parameters and training FLOPs per token (6N + 12 L d T) of a preset, counted on the meta device."""
    overrides = {"vocab_size": vocab_size} if vocab_size else {}
    cfg = _preset(preset, **overrides)
    n = build_model(cfg, "meta").num_params()
    t = seq_len or cfg.max_seq_len
    rows = [("preset", preset), ("parameters", f"{n:,} ({n / 1e9:.2f}B)"),
            ("layers x d_model", f"{cfg.n_layers} x {cfg.d_model}"),
            ("heads (query / key-value) x head_dim", f"{cfg.n_heads} / {cfg.n_kv_heads} x {cfg.head_dim}"),
            ("d_ff", f"{cfg.d_ff}"), ("vocabulary", f"{cfg.vocab_size}"),
            (f"training FLOPs per token at T={t}", f"{cfg.flops_per_token(t):.4g}")]
    return "\n".join(f"{k:<38} {v}" for k, v in rows)


def file_size(path: str | os.PathLike) -> int:
    """Bytes on disk of a checkpoint's weights."""

    return (Path(path) / MODEL_FILE).stat().st_size


def quantize_command(checkpoint: str, out: str, int8: bool = True, embedding: bool = True,
                     dtype: Literal["bfloat16", "float32"] = "bfloat16") -> str:
    """Write an int8-weight copy of CHECKPOINT to OUT (per-channel symmetric; activations in --dtype).

    --no-embedding keeps the shared input/output embedding in --dtype. The copy loads wherever checkpoints
    load (`palmkit generate`, the server), from safetensors only.
    """

    if not int8:
        raise PalmkitError("int8 is the only quantisation palmkit has: pass --int8")
    model, tokenizer, config = load_checkpoint(checkpoint)
    _require_plain(config, checkpoint)
    t0 = time.perf_counter()
    quantize_int8(model, embedding=embedding, dtype=getattr(torch, dtype))
    extra = {k: v for k, v in config.items() if k != "model"}
    save_checkpoint(out, model, tokenizer, extra={**extra, **saved_layout(model)})
    return (f"int8 checkpoint written to {out} in {time.perf_counter() - t0:.1f}s: "
            f"{file_size(checkpoint) / 2**20:.1f} MiB -> {file_size(out) / 2**20:.1f} MiB")


def compress_command(checkpoint: str, out: str, method: Literal["svd"] = "svd", rank_ratio: float = 0.0,
                     energy: float = 0.0, targets: list[str] | None = None, heal_steps: int = 0, data: str = "",
                     lr: float = 3e-4, seq_len: int = 256, batch: int = 8) -> str:
    """Write a low-rank copy of CHECKPOINT to OUT: each chosen projection becomes two thinner ones (truncated SVD).

    Give --rank-ratio R (rank kept / full rank) or --energy E (share of sum(s^2) kept). --targets picks the
    blocks' sub-layers (default: self_attn mlp); the shared embedding is never factorised. --heal-steps N
    --data CORPUS then fine-tunes the compressed model for N steps on the corpus.
    """

    if method != "svd":
        raise PalmkitError(f"unknown compression method {method!r}: svd is the one palmkit has")
    if heal_steps and not data:
        raise PalmkitError("--heal-steps needs --data CORPUS (a corpus built with the checkpoint's tokenizer)")
    model, tokenizer, config = load_checkpoint(checkpoint)
    _require_plain(config, checkpoint)
    before = model.num_params()
    ranks = low_rank(model, rank_ratio, energy, targets or ("self_attn", "mlp"))
    losses = heal(model, data, heal_steps, lr, seq_len, batch) if heal_steps else []
    extra = {k: v for k, v in config.items() if k != "model"}
    layout = saved_layout(model)
    layout.setdefault("low_rank", {"method": "svd", "ranks": {}}).update(
        rank_ratio=rank_ratio, energy=energy, heal_steps=heal_steps)
    save_checkpoint(out, model, tokenizer, extra={**extra, **layout})
    healed = f"; healed {heal_steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else ""
    return (f"{len(ranks)} layers factorised, parameters {before:,} -> {model.num_params():,}, "
            f"{file_size(checkpoint) / 2**20:.1f} MiB -> {file_size(out) / 2**20:.1f} MiB{healed}")


def _require_plain(config: dict, checkpoint: str) -> None:
    if "quantization" in config or "low_rank" in config:
        raise PalmkitError(f"{checkpoint} is already quantised or factorised: start from a plain checkpoint")


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


def evaluate_command(checkpoint: str, task: str = "", eval_tasks: list[str] | None = None, out: str = "",
                     split: str = "test", max_examples: int = 0, baseline: bool = True) -> str:
    """Evaluate a fine-tuned checkpoint on its task (and others zero-shot) beside a baseline; prints report.md.

    --task evaluates on another task than the one it was tuned on; --eval-tasks adds tasks (zero-shot when they
    differ from the tuning task: labels must carry the same names). Baselines always learn from the tuning task's
    training examples. Writes report.md, report.json and confusion-matrix PNGs to OUT (default CHECKPOINT/eval).
    """
    result = evaluate(checkpoint, task, eval_tasks, out, split, max_examples, baseline)
    return render_markdown(result) + f"\n\n(written to {Path(out) if out else Path(checkpoint) / 'eval'})"


def generate_command(checkpoint: str, prompt: str, max_new_tokens: int = 128, temperature: float = 0.8,
                     top_k: int = 0, top_p: float = 0.95, seed: int | None = None, stop: list[str] | None = None,
                     device: str = "cpu") -> None:
    """Complete PROMPT with the model in CHECKPOINT, streaming text to the terminal."""
    model, tokenizer, _ = load_checkpoint(checkpoint, device=device)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, stop=tuple(stop or ()))
    sys.stdout.write(prompt)
    done = stream_to(model, tokenizer, prompt, params)
    sys.stdout.write(f"\n[{len(done.token_ids)} tokens, finish_reason={done.finish_reason}]\n")
