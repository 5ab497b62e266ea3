"""Export a checkpoint as a Hugging Face `CohereForCausalLM` folder (transformers is not needed here).

Cohere's architecture is PaLM's (parallel block, one bias-free LayerNorm, SwiGLU, multi-query
attention, interleaved rotary pairs, tied embeddings, a logit scale), so export is a rename.

The tokenizer goes out as `tokenizer.json` (the `tokenizers` library's format: loading needs neither
sentencepiece nor protobuf) built from the SentencePiece model's pieces, with the checkpoint's BOS rule and the
chat template; generation stops at `</s>` and at the chat template's `<|end|>`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from palmkit.errors import PalmkitError
from palmkit.io import atomic_copy, atomic_write_json, check_destination, load_tensors, save_tensors, staged_dir
from palmkit.model.chat_template import CONTENT_CUT, jinja_template
from palmkit.model.checkpoint import MODEL_FILE, TOKENIZER_FILE, bos_rule, load_config, require_language_model
from palmkit.model.gguf_export import OutType, export_gguf
from palmkit.model.layouts import dense_weights, hf_state_dict, is_dense
from palmkit.model.palm import ModelConfig
from palmkit.model.tokenizer import CHAT_SYMBOLS, Tokenizer


def hf_config(cfg: ModelConfig, eos_ids: list[int] | None = None) -> dict:
    """config.json for transformers' CohereConfig (eos_ids: the tokenizer's `stop_ids`; EOS alone by default)."""
    return {
        "architectures": ["CohereForCausalLM"],
        "model_type": "cohere",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "layer_norm_eps": cfg.norm_eps,
        "logit_scale": cfg.d_model ** -0.5,
        # transformers 5 silently falls back to theta 500000 unless both spellings are present
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": True,
        "use_qk_norm": False,
        "attention_bias": False,
        "pad_token_id": cfg.pad_id,
        "bos_token_id": cfg.bos_id,
        "eos_token_id": eos_ids or [cfg.eos_id],
        "torch_dtype": "float32",
    }


def tokenizer_config(cfg: ModelConfig, add_bos: bool = True) -> dict:
    """tokenizer_config.json: the fast tokenizer of tokenizer.json, BOS by the checkpoint's rule, the chat template."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "model_max_length": cfg.max_seq_len,
        "additional_special_tokens": list(CHAT_SYMBOLS),
        "chat_template": jinja_template(add_bos),
    }


def tokenizer_json(tokenizer: Tokenizer, add_bos: bool = True) -> dict:
    """The SentencePiece BPE model as a `tokenizers` BPE model that gives the same ids.

    SentencePiece merges, at each step, the adjacent pair whose merged piece scores highest; a `tokenizers`
    BPE merges the pair of lowest rank. Ranking every split of every piece by the merged piece's score makes
    them the same algorithm (transformers' own SentencePiece conversion does this too). Spaces become "▁" and
    nothing else is normalised, as in training; unknown characters fall back to bytes. Control pieces and the
    chat markers are added tokens. The pre-tokenizer cuts text at CONTENT_CUT and drops it: the exported chat
    template writes it after the "<" of a marker typed inside a message, so that the marker stays letters.
    """
    sp = tokenizer.sp
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    added = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i) or pieces[i] in CHAT_SYMBOLS]
    skip = set(added)
    mergeable = {p: i for i, p in enumerate(pieces) if i not in skip and not sp.is_byte(i) and not sp.is_unused(i)}
    merges = sorted((-sp.get_score(i), i, p[:k], p[k:]) for p, i in mergeable.items()
                    for k in range(1, len(p)) if p[:k] in mergeable and p[k:] in mergeable)
    bos = pieces[tokenizer.bos_id]
    lead = [{"SpecialToken": {"id": bos, "type_id": 0}}] if add_bos else []
    second = [{"SpecialToken": {"id": bos, "type_id": 1}}] if add_bos else []
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": pieces[i], "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i in added],
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        "pre_tokenizer": {"type": "Split", "pattern": {"String": CONTENT_CUT}, "behavior": "Removed",
                          "invert": False},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [*lead, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [*lead, {"Sequence": {"id": "A", "type_id": 0}}, *second, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [tokenizer.bos_id], "tokens": [bos]}} if add_bos else {},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": pieces[sp.unk_id()], "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": {p: i for i, p in enumerate(pieces)}, "merges": [[a, b] for *_, a, b in merges]},
    }


# What an export folder holds: an existing OUT is replaced only when it holds nothing else (or with --force).
EXPORT_FILES = frozenset({"model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json",
                          "special_tokens_map.json", "tokenizer.json", "tokenizer.model"})


def export_hf(checkpoint: str | os.PathLike, out: str | os.PathLike, drop_head: bool = False,
              force: bool = False) -> Path:
    """Write a folder that `transformers.AutoModelForCausalLM.from_pretrained(out)` loads offline.

    Args:
        checkpoint: a palmkit checkpoint folder (int8 or low-rank ones are written as the dense weights they
            stand for)
        out: the Hugging Face folder (CohereForCausalLM: config.json, model.safetensors, tokenizer.json with the
            chat template)
        drop_head: export a classify or ner checkpoint's language model without its head (refused otherwise:
            CohereForCausalLM has no place for the head, so the export would not classify or tag)
        force: write into OUT even when it holds files of its own: the export's files are replaced, the others
            kept (without it such a folder is refused, never deleted)
    """
    checkpoint, out = Path(checkpoint), Path(out)
    check_destination(out, EXPORT_FILES, force)  # before the work, not after it
    config = load_config(checkpoint)
    require_language_model(config, checkpoint, "a transformers CohereForCausalLM", drop_head)
    cfg = ModelConfig.from_dict(config["model"])
    state = load_tensors(checkpoint / MODEL_FILE)
    if not is_dense(config):  # transformers gets the dense weights they stand for
        state = dense_weights(state)
    tensors = hf_state_dict(state)
    add_bos = bos_rule(config)
    tokenizer = Tokenizer(checkpoint / TOKENIZER_FILE, add_bos=add_bos)
    eos_ids = tokenizer.stop_ids
    with staged_dir(out, EXPORT_FILES, force) as staging:
        save_tensors(staging / "model.safetensors", tensors, metadata={"format": "pt"})
        atomic_write_json(staging / "config.json", hf_config(cfg, eos_ids))
        atomic_write_json(staging / "generation_config.json", {
            "bos_token_id": cfg.bos_id, "eos_token_id": eos_ids, "pad_token_id": cfg.pad_id})
        atomic_write_json(staging / "tokenizer_config.json", tokenizer_config(cfg, add_bos))
        atomic_write_json(staging / "special_tokens_map.json", {
            "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})
        atomic_write_json(staging / "tokenizer.json", tokenizer_json(tokenizer, add_bos))
        atomic_copy(checkpoint / TOKENIZER_FILE, staging / "tokenizer.model")  # for tools that read SentencePiece
    return out


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, format: Literal["hf", "gguf"] = "hf",
           outtype: OutType = "auto", drop_head: bool = False, force: bool = False) -> Path:
    """Export a checkpoint for other tools: a Hugging Face folder, or a GGUF file for llama.cpp and Ollama.

    `--format hf` writes a folder that `transformers.AutoModelForCausalLM.from_pretrained(OUT)` loads offline.
    `--format gguf` writes OUT (a .gguf file, run by `llama-server -m OUT` or `llama-cli -m OUT`) and
    OUT's name with `.Modelfile` for `ollama create NAME -f OUT.Modelfile`.

    Args:
        checkpoint: a palmkit checkpoint folder (int8 or low-rank ones are written to transformers as the dense
            weights they stand for; low-rank ones are refused for GGUF)
        out: the Hugging Face folder (hf) or the .gguf file (gguf)
        format: hf (CohereForCausalLM) or gguf (llama.cpp's command-r)
        outtype: GGUF only: f32, f16, bf16 or q8_0 for the weight matrices; auto: q8_0 for an int8 checkpoint
            (its int8 values kept, no float round trip), f16 otherwise
        drop_head: export a classify or ner checkpoint's language model without its head (refused otherwise:
            neither format has a place for the head, so the export would not classify or tag)
        force: hf: write into OUT even when it holds files of its own (the export's files are replaced, the others
            kept); gguf: replace an existing OUT and its Modelfile. Without it such a destination is refused
    """
    if format == "gguf":
        return export_gguf(checkpoint, out, outtype, drop_head, force)
    if format != "hf":
        raise PalmkitError(f"format must be hf or gguf, got {format!r}")
    if outtype != "auto":
        raise PalmkitError("--outtype is for --format gguf; the Hugging Face export keeps the checkpoint's weights")
    return export_hf(checkpoint, out, drop_head, force)
