"""Export a checkpoint as a Hugging Face `CohereForCausalLM` folder (transformers is not needed here).

Cohere's architecture is PaLM's (parallel block, one bias-free LayerNorm, SwiGLU, multi-query
attention, interleaved rotary pairs, tied embeddings, a logit scale), so export is a rename.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from palmkit.io import atomic_write_json, load_tensors, save_tensors, staged_dir
from palmkit.model.checkpoint import MODEL_FILE, TOKENIZER_FILE, load_config
from palmkit.model.layouts import dense_weights, hf_state_dict, is_dense
from palmkit.model.palm import ModelConfig
from palmkit.model.tokenizer import CHAT_SYMBOLS


def hf_config(cfg: ModelConfig) -> dict:
    """config.json for transformers' CohereConfig."""
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
        "eos_token_id": cfg.eos_id,
        "torch_dtype": "float32",
    }


def tokenizer_config(cfg: ModelConfig) -> dict:
    """tokenizer_config.json: a SentencePiece LlamaTokenizer that adds nothing of its own."""
    return {
        "tokenizer_class": "LlamaTokenizer",
        "legacy": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "add_dummy_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "model_max_length": cfg.max_seq_len,
        "additional_special_tokens": list(CHAT_SYMBOLS),
    }


def export_hf(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write a folder that `transformers.AutoModelForCausalLM.from_pretrained(out)` loads offline.

    Args:
        checkpoint: a palmkit checkpoint folder (int8 or low-rank ones are written as the dense weights they
            stand for)
        out: the Hugging Face folder (CohereForCausalLM: config.json, model.safetensors, tokenizer)
    """
    checkpoint, out = Path(checkpoint), Path(out)
    config = load_config(checkpoint)
    cfg = ModelConfig.from_dict(config["model"])
    state = load_tensors(checkpoint / MODEL_FILE)
    if not is_dense(config):  # transformers gets the dense weights they stand for
        state = dense_weights(state)
    tensors = hf_state_dict(state)
    with staged_dir(out) as staging:
        save_tensors(staging / "model.safetensors", tensors, metadata={"format": "pt"})
        atomic_write_json(staging / "config.json", hf_config(cfg))
        atomic_write_json(staging / "generation_config.json", {
            "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "pad_token_id": cfg.pad_id})
        atomic_write_json(staging / "tokenizer_config.json", tokenizer_config(cfg))
        atomic_write_json(staging / "special_tokens_map.json", {
            "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})
        shutil.copyfile(checkpoint / TOKENIZER_FILE, staging / "tokenizer.model")
    return out
