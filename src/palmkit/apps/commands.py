"""Commands whose API function needs a few lines more for the terminal: text instead of objects, streaming."""

from __future__ import annotations

import dataclasses
import io
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
from palmkit.io import check_destination, split_list
from palmkit.model.checkpoint import CHECKPOINT_FILES, MODEL_FILE, load_checkpoint, save_checkpoint
from palmkit.model.layouts import require_dense, saved_layout
from palmkit.model.low_rank import low_rank
from palmkit.model.palm import build_model, preset
from palmkit.model.quant import quantize_int8
from palmkit.train.heal import heal

_preset = preset  # `describe` takes a parameter of that name
# generate's sampling: SamplingParams' own defaults, read from one instance that is copied before any change
SAMPLING = SamplingParams()


def describe(preset: str = "small", vocab_size: int = 0, seq_len: int = 0) -> str:
    """Parameters and training FLOPs per token (6N + 12 L d T, PaLM appendix B) of a preset.

    The model is built on the meta device, so even palm-540b is counted in a moment without memory.

    Args:
        preset: tiny, mini, small, base, palm-8b, palm-62b or palm-540b
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
                     dtype: Literal["bfloat16", "float32"] = "bfloat16", force: bool = False) -> str:
    """Write an int8-weight copy of CHECKPOINT to OUT for CPU inference.

    Weights are quantised per output channel, symmetrically; activations run in DTYPE. The copy loads wherever
    checkpoints load (`palmkit generate`, the server), from safetensors only.

    Args:
        checkpoint: a plain (not yet quantised or factorised) checkpoint folder
        out: folder of the int8 copy
        int8: quantise the weights to int8 (the one quantisation palmkit has)
        embedding: quantise the shared input/output embedding too; false keeps it in DTYPE
        dtype: dtype of the activations and of the weights kept in floating point
        force: write into OUT even when it holds other files: the checkpoint's files are replaced, the others
            kept (without it such a folder is refused, never deleted)
    """
    if not int8:
        raise PalmkitError("int8 is the only quantisation palmkit has: leave --int8 on")
    check_destination(out, CHECKPOINT_FILES, force)  # before the work, not after it
    model, tokenizer, config = load_checkpoint(checkpoint)
    require_dense(config, checkpoint, "quantise")
    t0 = time.perf_counter()
    quantize_int8(model, embedding=embedding, dtype=getattr(torch, dtype))
    extra = {k: v for k, v in config.items() if k != "model"}
    save_checkpoint(out, model, tokenizer, extra={**extra, **saved_layout(model)}, force=force)
    return (f"int8 checkpoint written to {out} in {time.perf_counter() - t0:.1f}s: "
            f"{file_size(checkpoint) / 2**20:.1f} MiB -> {file_size(out) / 2**20:.1f} MiB")


def compress_command(checkpoint: str, out: str, method: Literal["svd"] = "svd", rank_ratio: float = 0.0,
                     energy: float = 0.0, targets: list[str] | str = "self_attn,mlp", heal_steps: int = 0,
                     data: str = "", lr: float = 3e-4, seq_len: int = 256, batch: int = 8, force: bool = False) -> str:
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
        force: write into OUT even when it holds other files: the checkpoint's files are replaced, the others
            kept (without it such a folder is refused, never deleted)
    """
    if method != "svd":
        raise PalmkitError(f"unknown compression method {method!r}: svd is the one palmkit has")
    if heal_steps and not data:
        raise PalmkitError("--heal_steps needs --data CORPUS (a corpus built with the checkpoint's tokenizer)")
    check_destination(out, CHECKPOINT_FILES, force)
    model, tokenizer, config = load_checkpoint(checkpoint)
    require_dense(config, checkpoint, "factorise")
    before = model.num_params()
    ranks = low_rank(model, rank_ratio, energy, split_list(targets))
    losses = heal(model, data, heal_steps, lr, seq_len, batch) if heal_steps else []
    extra = {k: v for k, v in config.items() if k != "model"}
    layout = saved_layout(model)
    layout.setdefault("low_rank", {"method": "svd", "ranks": {}}).update(
        rank_ratio=rank_ratio, energy=energy, heal_steps=heal_steps)
    save_checkpoint(out, model, tokenizer, extra={**extra, **layout}, force=force)
    healed = f"; healed {heal_steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else ""
    return (f"{len(ranks)} layers factorised, parameters {before:,} -> {model.num_params():,}, "
            f"{file_size(checkpoint) / 2**20:.1f} MiB -> {file_size(out) / 2**20:.1f} MiB{healed}")


def classify_command(texts: list[str] | None = None, /, *, checkpoint: str, batch_size: int = 32, input: str = "",
                     output: str = "", field: str = "text") -> str | None:
    """Classify texts with a fine-tuned classifier: one line per text with its label, probability and text.

    With --input/--output, the records of a JSONL file instead, split over the ranks of `torchrun` and resumable
    (palmkit.infer.sharded): each gets "label" and "probabilities".

    Args:
        texts: the texts to classify (none with --input)
        checkpoint: a classifier folder written by `palmkit finetune classify`
        batch_size: texts per forward pass
        input: a JSONL file of objects, each with a string field FIELD, to classify instead of TEXTS
        output: the JSONL file of INPUT's records with their results, in input order
        field: the field of each INPUT record that holds its text
    """
    if _batch_job(texts, input, output):
        from palmkit.infer.sharded import classify_file

        return classify_file(checkpoint, input, output, batch_size, field)
    clf = load_classifier(checkpoint)
    rows = clf.predict(texts, batch_size)
    return "\n".join(f"{label}\t{probs[label]:.3f}\t{text}" for text, (label, probs) in zip(texts, rows, strict=True))


def tag_command(texts: list[str] | None = None, /, *, checkpoint: str, json_output: bool = False, input: str = "",
                output: str = "", field: str = "text", batch_size: int = 32) -> str | None:
    """Find named entities with a fine-tuned tagger: each text with its entities marked as [TYPE text].

    With --input/--output, the records of a JSONL file instead, split over the ranks of `torchrun` and resumable
    (palmkit.infer.sharded): each gets "entities".

    Args:
        texts: the texts to tag (none with --input)
        checkpoint: a tagger folder written by `palmkit finetune ner`
        json_output: one JSON line per text instead, {"text", "entities": [{"type", "text", "start", "end"}]}
        input: a JSONL file of objects, each with a string field FIELD, to tag instead of TEXTS
        output: the JSONL file of INPUT's records with their entities, in input order
        field: the field of each INPUT record that holds its text
        batch_size: records per batch with --input
    """
    if _batch_job(texts, input, output):
        from palmkit.infer.sharded import tag_file

        return tag_file(checkpoint, input, output, batch_size, field)
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


def _batch_job(texts: list[str] | None, input: str, output: str) -> bool:
    """Whether a command works on an --input file (True) or on texts given on the command line (False)."""
    if bool(input) != bool(output):
        raise PalmkitError("--input and --output go together")
    if bool(input) == bool(texts):
        raise PalmkitError("give either texts or --input FILE --output FILE")
    return bool(input)


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


def generate_command(checkpoint: str, prompt: str = "", sampling: SamplingParams = SAMPLING, device: str = "cpu",
                     tp: int = 1, vocab_parallel: bool = True, input: str = "", output: str = "",
                     field: str = "prompt", batch_size: int = 8) -> str | None:
    """Complete PROMPT with the model in CHECKPOINT, streaming the text to the terminal.

    `torchrun --nproc_per_node=N -m palmkit.cli generate --tp N ...` splits the model over N processes
    (tensor parallelism, palmkit.infer.tensor_parallel); rank 0 writes the text. With --input/--output, the
    prompts of a JSONL file instead, split over the ranks of `torchrun` and resumable (palmkit.infer.sharded).

    Args:
        checkpoint: a checkpoint folder
        prompt: the text to continue
        sampling: how each token is picked, SamplingParams' fields: --sampling.max_new_tokens (most new tokens),
            --sampling.temperature (0: greedy decoding), --sampling.top_k (the k most likely tokens only; 0: no
            cut), --sampling.top_p (nucleus sampling: the most likely tokens that hold this probability; 1: no
            cut), --sampling.seed (a repeatable text; none: a fresh one), --sampling.stop (strings that end the
            text: a list, '[".", "###"]', or one more with --sampling.stop+ '###'); logprobs change nothing here
        device: cpu, cuda, cuda:1, ... (under torchrun each rank takes the GPU of its local rank, or the CPU)
        tp: tensor-parallel processes (torchrun's --nproc_per_node); 1: one process
        vocab_parallel: with --tp, split the shared embedding by vocabulary (false: keep it whole on every
            rank)
        input: a JSONL file of objects, each with a string field FIELD, to complete instead of PROMPT
        output: the JSONL file of INPUT's records with "completion", "finish_reason", "completion_tokens"
        field: the field of each INPUT record that holds its prompt
        batch_size: prompts generated together with --input
    """
    params = dataclasses.replace(sampling)  # a copy: the seed may be set below
    if _batch_job([prompt] if prompt else None, input, output):
        if tp > 1:
            raise PalmkitError("--input splits the records over the ranks (each holds the whole model): drop --tp")
        from palmkit.infer.sharded import generate_file

        return generate_file(checkpoint, input, output, params, batch_size, field, device)
    out = sys.stdout
    if tp > 1:
        from palmkit.infer.tensor_parallel import agree_on_seed, load_tensor_parallel

        model, tokenizer, d = load_tensor_parallel(checkpoint, tp, "generate", vocab_parallel=vocab_parallel)
        params.seed = agree_on_seed(params.seed, d)  # every rank must draw the same tokens
        out = out if d.is_main else io.StringIO()
    else:
        model, tokenizer, _ = load_checkpoint(checkpoint, device=device)
    out.write(prompt)
    done = stream_to(model, tokenizer, prompt, params, out)
    out.write(f"\n[{len(done.token_ids)} tokens, finish_reason={done.finish_reason}]\n")
    return None
