"""Commands whose API function needs a few lines more for the terminal: text instead of objects, streaming."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Literal

import torch

from palmkit.errors import PalmkitError
from palmkit.finetune.evaluate import evaluate, render_markdown
from palmkit.finetune.predict import load_classifier, load_tagger
from palmkit.infer.generate import stream_to
from palmkit.infer.sampling import SamplingParams
from palmkit.io import split_list
from palmkit.model.checkpoint import MODEL_FILE, load_checkpoint, save_checkpoint
from palmkit.model.layouts import require_dense, saved_layout
from palmkit.model.low_rank import low_rank
from palmkit.model.palm import build_model, preset
from palmkit.model.quant import quantize_int8
from palmkit.train.heal import heal

_preset = preset  # `describe` takes a parameter of that name


def describe(preset: str = "small", vocab_size: int = 0, seq_len: int = 0) -> str:
    """Parameters and training FLOPs per token (6N + 12 L d T, PaLM appendix B) of a preset.

    The model is built on the meta device, so even palm-540b is counted in a moment without memory.

    Args:
        preset: tiny, small, base, palm-8b, palm-62b or palm-540b
        vocab_size: vocabulary size; 0: the preset's
        seq_len: sequence length T of the FLOP count; 0: the preset's context
    """
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
    """Write an int8-weight copy of CHECKPOINT to OUT for CPU inference.

    Weights are quantised per output channel, symmetrically; activations run in DTYPE. The copy loads wherever
    checkpoints load (`palmkit generate`, the server), from safetensors only.

    Args:
        checkpoint: a plain (not yet quantised or factorised) checkpoint folder
        out: folder of the int8 copy
        int8: quantise the weights to int8 (the one quantisation palmkit has)
        embedding: quantise the shared input/output embedding too; false keeps it in DTYPE
        dtype: dtype of the activations and of the weights kept in floating point
    """
    if not int8:
        raise PalmkitError("int8 is the only quantisation palmkit has: leave --int8 on")
    model, tokenizer, config = load_checkpoint(checkpoint)
    require_dense(config, checkpoint, "quantise")
    t0 = time.perf_counter()
    quantize_int8(model, embedding=embedding, dtype=getattr(torch, dtype))
    extra = {k: v for k, v in config.items() if k != "model"}
    save_checkpoint(out, model, tokenizer, extra={**extra, **saved_layout(model)})
    return (f"int8 checkpoint written to {out} in {time.perf_counter() - t0:.1f}s: "
            f"{file_size(checkpoint) / 2**20:.1f} MiB -> {file_size(out) / 2**20:.1f} MiB")


def compress_command(checkpoint: str, out: str, method: Literal["svd"] = "svd", rank_ratio: float = 0.0,
                     energy: float = 0.0, targets: list[str] | str = "self_attn,mlp", heal_steps: int = 0,
                     data: str = "", lr: float = 3e-4, seq_len: int = 256, batch: int = 8) -> str:
    """Write a low-rank copy of CHECKPOINT to OUT: each chosen projection becomes two thinner ones (truncated SVD).

    Give RANK_RATIO or ENERGY. The shared embedding is never factorised. With HEAL_STEPS and DATA, the
    compressed model is then fine-tuned on the corpus to win back some of what the truncation lost.

    Args:
        checkpoint: a plain (not yet quantised or factorised) checkpoint folder
        out: folder of the low-rank copy
        method: svd, the one compression palmkit has
        rank_ratio: rank kept / full rank of each factorised weight
        energy: share of the squared singular values, sum(s^2), that each factorised weight keeps
        targets: sub-layers of each block to factorise (self_attn, mlp, or a projection such as up_proj):
            a list, or one comma-separated string
        heal_steps: optimiser steps of healing on DATA; 0: none
        data: corpus folder built with the checkpoint's tokenizer (needed for healing)
        lr: peak learning rate of the healing
        seq_len: tokens per healing sequence
        batch: sequences per healing step
    """
    if method != "svd":
        raise PalmkitError(f"unknown compression method {method!r}: svd is the one palmkit has")
    if heal_steps and not data:
        raise PalmkitError("--heal_steps needs --data CORPUS (a corpus built with the checkpoint's tokenizer)")
    model, tokenizer, config = load_checkpoint(checkpoint)
    require_dense(config, checkpoint, "factorise")
    before = model.num_params()
    ranks = low_rank(model, rank_ratio, energy, split_list(targets))
    losses = heal(model, data, heal_steps, lr, seq_len, batch) if heal_steps else []
    extra = {k: v for k, v in config.items() if k != "model"}
    layout = saved_layout(model)
    layout.setdefault("low_rank", {"method": "svd", "ranks": {}}).update(
        rank_ratio=rank_ratio, energy=energy, heal_steps=heal_steps)
    save_checkpoint(out, model, tokenizer, extra={**extra, **layout})
    healed = f"; healed {heal_steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else ""
    return (f"{len(ranks)} layers factorised, parameters {before:,} -> {model.num_params():,}, "
            f"{file_size(checkpoint) / 2**20:.1f} MiB -> {file_size(out) / 2**20:.1f} MiB{healed}")


def classify_command(texts: list[str], /, checkpoint: str, batch_size: int = 32) -> str:
    """Classify texts with a fine-tuned classifier: one line per text with its label, probability and text.

    Args:
        texts: the texts to classify
        checkpoint: a classifier folder written by `palmkit finetune classify`
        batch_size: texts per forward pass
    """
    clf = load_classifier(checkpoint)
    rows = clf.predict(texts, batch_size)
    return "\n".join(f"{label}\t{probs[label]:.3f}\t{text}" for text, (label, probs) in zip(texts, rows, strict=True))


def tag_command(texts: list[str], /, checkpoint: str, json_output: bool = False) -> str:
    """Find named entities with a fine-tuned tagger: each text with its entities marked as [TYPE text].

    Args:
        texts: the texts to tag
        checkpoint: a tagger folder written by `palmkit finetune ner`
        json_output: one JSON line per text instead, {"text", "entities": [{"type", "text", "start", "end"}]}
    """
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


def evaluate_command(checkpoint: str, task: str = "", eval_tasks: list[str] | str = "", out: str = "",
                     split: str = "test", max_examples: int = 0, baseline: bool = True) -> str:
    """Evaluate a fine-tuned checkpoint on its task (and others zero-shot) beside a baseline; prints report.md.

    The baselines (TF-IDF with logistic regression for classifiers, the most frequent tag of each word for
    taggers) learn from the tuning task's training examples. Writes report.md, report.json and confusion-matrix
    PNGs.

    Args:
        checkpoint: a folder written by `palmkit finetune`
        task: evaluate on this built-in task instead of the one the model was tuned on
        eval_tasks: more tasks to evaluate on, zero-shot where they differ from the tuning task (their labels
            must carry the same names): a list, or one comma-separated string
        out: folder of the report; default: CHECKPOINT/eval
        split: which split of each task: test, valid or train
        max_examples: evaluate on at most this many examples of each task (a seeded sample); 0: all
        baseline: compare with the baseline (false skips it)
    """
    result = evaluate(checkpoint, task, split_list(eval_tasks), out, split, max_examples, baseline)
    return render_markdown(result) + f"\n\n(written to {Path(out) if out else Path(checkpoint) / 'eval'})"


def generate_command(checkpoint: str, prompt: str, max_new_tokens: int = 128, temperature: float = 0.8,
                     top_k: int = 0, top_p: float = 0.95, seed: int | None = None,
                     stop: list[str] | str | None = None, device: str = "cpu") -> None:
    """Complete PROMPT with the model in CHECKPOINT, streaming the text to the terminal.

    Args:
        checkpoint: a checkpoint folder
        prompt: the text to continue
        max_new_tokens: stop after this many tokens
        temperature: sampling temperature; 0: greedy decoding
        top_k: sample among the k most likely tokens only; 0: no limit
        top_p: sample among the most likely tokens that together hold this probability (nucleus sampling)
        seed: seed of the sampling, for a repeatable text; none: a fresh one
        stop: stop when the text ends with this string (one string, or a list of them)
        device: cpu, cuda, cuda:1, ...
    """
    model, tokenizer, _ = load_checkpoint(checkpoint, device=device)
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, stop=stops)
    sys.stdout.write(prompt)
    done = stream_to(model, tokenizer, prompt, params)
    sys.stdout.write(f"\n[{len(done.token_ids)} tokens, finish_reason={done.finish_reason}]\n")
