"""Export a checkpoint as one GGUF file that llama.cpp (and Ollama, which runs it) loads, with an Ollama Modelfile.

PaLM's architecture is Cohere's (parallel block, one bias-free LayerNorm, SwiGLU, multi-query attention, rotary on
adjacent pairs, tied embeddings, a logit scale), which llama.cpp runs as `command-r`; the weights keep their shapes
and only change names (`blk.N.attn_q` for `layers.N.self_attn.q_proj`, ...), as in llama.cpp's own converter.

The tokenizer goes in as llama.cpp's SentencePiece model (`tokenizer.ggml.model = llama`): every piece with its
score and type (control, user-defined for the chat markers, byte for the fallback bytes), so llama.cpp merges pairs
by score exactly as SentencePiece's BPE does. palmkit trains without SentencePiece's dummy prefix, so the file says
`add_space_prefix = false` (llama.cpp would otherwise write "▁" before the first word); BOS follows the
checkpoint's rule (`add_bos_token`), and generation ends at EOS and at the chat template's `<|end|>` (end of turn).

The chat template is palmkit's, in Jinja, with message content written as it is: llama.cpp reads every marker in a
rendered prompt as its token, so a marker typed inside a message becomes a marker there (palmkit and the
transformers export keep it letters). int8 checkpoints go out as q8_0 directly: q8_0 stores int8 values with one
fp16 scale per 32 weights, so each row's int8 values are kept and its bf16 scale repeated per block (exact unless
a scale is below fp16's normal range, 6e-5).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Literal

import gguf
import numpy as np
import torch

from palmkit.errors import PalmkitError
from palmkit.io import atomic_write_bytes, load_tensors
from palmkit.model.chat_template import jinja_template
from palmkit.model.checkpoint import MODEL_FILE, TOKENIZER_FILE, bos_rule, load_config, require_language_model
from palmkit.model.layouts import dense_weights
from palmkit.model.palm import ModelConfig
from palmkit.model.tokenizer import CHAT_SYMBOLS, Tokenizer

OutType = Literal["auto", "f32", "f16", "bf16", "q8_0"]
ARCH = "command-r"
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
QTYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
          "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
Q8_BLOCK = 32  # weights per q8_0 block (ggml's QK8_0)

# palmkit names (after the `layers.N.` prefix) to llama.cpp's command-r tensor names
_LAYER_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
                "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_TOP_NAMES = {"embed_tokens": "token_embd", "norm": "output_norm"}
_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)\.(weight|weight_scale)$")


def gguf_name(name: str) -> str:
    """llama.cpp's name for a palmkit weight name: `layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`."""
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    base, _, suffix = name.rpartition(".")
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{suffix}"
    raise PalmkitError(f"weight {name!r} has no place in llama.cpp's {ARCH} architecture")


def q8_0_from_int8(q: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """q8_0 blocks (fp16 scale, 32 int8 values) of per-row int8 weights: the values kept, the row's scale per block."""
    rows, cols = q.shape
    n_blocks = cols // Q8_BLOCK
    d = scale.float().numpy().astype(np.float16).view(np.uint8).reshape(rows, 1, 2)
    qs = q.numpy().view(np.uint8).reshape(rows, n_blocks, Q8_BLOCK)
    return np.concatenate([np.broadcast_to(d, (rows, n_blocks, 2)), qs], axis=2).reshape(rows, n_blocks * 34)


def vocabulary(tokenizer: Tokenizer, n_vocab: int) -> tuple[list[bytes], list[float], list[int]]:
    """(pieces, scores, token types) of the SentencePiece model as llama.cpp reads them, padded to the model's rows."""
    sp = tokenizer.sp
    T = gguf.TokenType
    tokens = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [int(T.UNUSED)] * n_vocab
    for i in range(sp.get_piece_size()):
        if sp.is_unknown(i):
            kind = T.UNKNOWN
        elif sp.is_control(i):
            kind = T.CONTROL
        elif sp.is_unused(i):
            kind = T.UNUSED
        elif sp.is_byte(i):
            kind = T.BYTE
        elif sp.id_to_piece(i) in CHAT_SYMBOLS:  # SentencePiece's user-defined pieces: matched in any text
            kind = T.USER_DEFINED
        else:
            kind = T.NORMAL
        tokens[i], scores[i], types[i] = sp.id_to_piece(i).encode(), sp.get_score(i), int(kind)
    return tokens, scores, types


def modelfile(gguf_file: str, cfg: ModelConfig) -> str:
    """An Ollama Modelfile for the GGUF: palmkit's chat template (Go template syntax), stop tokens, sampling."""
    return (
        "# ollama create NAME -f THIS_FILE && ollama run NAME\n"
        f"FROM ./{gguf_file}\n"
        # each message is <|role|>content<|end|> and a newline; the reply follows <|assistant|> (chat_template.py)
        'TEMPLATE """{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}<|end|>\n{{ end }}<|assistant|>"""\n'
        'PARAMETER stop "<|end|>"\n'
        'PARAMETER stop "</s>"\n'
        f"PARAMETER num_ctx {cfg.max_seq_len}\n"
        # palmkit's sampling defaults: the model's own distribution, no cut and no repetition penalty
        "PARAMETER temperature 1\n"
        "PARAMETER top_k 0\n"
        "PARAMETER top_p 1\n"
        "PARAMETER repeat_penalty 1\n"
    )


def _languages(config: dict) -> list[str]:
    """The languages the checkpoint was validated on (pretraining's per-language `val/LANG/ppl` metrics)."""
    metrics = config.get("metrics", {})
    return sorted({k.split("/")[1] for k in metrics if k.count("/") == 2 and k.endswith("/ppl")})


def _summary(config: dict) -> str:
    """A one-line description of how the checkpoint was made."""
    train, parts = config.get("train") or {}, []
    if "step" in config:
        parts.append(f"{config['step']} steps")
    if train:
        parts.append(f"preset {train.get('preset')}, seq_len {train.get('seq_len')}, "
                     f"{train.get('batch_tokens')} tokens per batch")
    if config.get("task"):
        parts.append(f"fine-tuned: {config['task']}")
    return "palmkit PaLM model" + (" (" + "; ".join(parts) + ")" if parts else "")


def export_gguf(checkpoint: str | os.PathLike, out: str | os.PathLike, outtype: OutType = "auto",
                drop_head: bool = False, force: bool = False, name: str | None = None) -> Path:
    """Write `out` (a .gguf file) and an Ollama Modelfile beside it (`out` with the suffix `.Modelfile`).

    outtype: f32, f16, bf16 or q8_0 for the 2-D weights (norms stay f32); auto: q8_0 for an int8 checkpoint
    (its int8 values kept), f16 otherwise (as llama.cpp's converter). Existing files are replaced only with `force`.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    card = out.with_suffix(".Modelfile")
    if out.suffix != ".gguf":
        raise PalmkitError(f"{out}: a GGUF export is one file: give a path ending in .gguf")
    for path in (out, card):
        if path.is_dir() or (path.exists() and not force):
            raise PalmkitError(f"{path} exists: give a new path, or --force to replace it")
    config = load_config(checkpoint)
    require_language_model(config, checkpoint, f"llama.cpp's {ARCH}", drop_head)
    if "low_rank" in config:
        raise PalmkitError(f"{checkpoint} is low-rank (palmkit compress): llama.cpp has no factorised layers, so the "
                           "GGUF would hold the full-size product; export the checkpoint it was compressed from")
    cfg = ModelConfig.from_dict(config["model"])
    if cfg.n_heads * cfg.head_dim != cfg.d_model:
        raise PalmkitError(f"{checkpoint}: llama.cpp's {ARCH} needs n_heads * head_dim == d_model "
                           f"({cfg.n_heads} * {cfg.head_dim} != {cfg.d_model})")
    int8 = "quantization" in config
    outtype = outtype if outtype != "auto" else ("q8_0" if int8 else "f16")
    if outtype not in QTYPES:
        raise PalmkitError(f"outtype must be one of auto, {', '.join(QTYPES)}; got {outtype!r}")
    state = load_tensors(checkpoint / MODEL_FILE)
    tokenizer = Tokenizer(checkpoint / TOKENIZER_FILE, add_bos=bos_rule(config))
    if tokenizer.vocab_size > cfg.vocab_size:
        raise PalmkitError(f"{checkpoint}: the tokenizer has {tokenizer.vocab_size} pieces, the model "
                           f"{cfg.vocab_size} embedding rows")

    writer = gguf.GGUFWriter(path=None, arch=ARCH)
    _write_metadata(writer, cfg, config, tokenizer, name or checkpoint.resolve().name, outtype)
    _add_tensors(writer, state, outtype, keep_int8=int8 and outtype == "q8_0")

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)  # an ordinary file's mode (mkstemp's is 0600): Ollama's server may run as its own user
    try:  # written beside the target and renamed into place: a failure leaves no half-written file
        writer.write_header_to_file(path=Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=True)
        writer.close()
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    atomic_write_bytes(card, modelfile(out.name, cfg).encode())
    return out


def _write_metadata(w: gguf.GGUFWriter, cfg: ModelConfig, config: dict, tokenizer: Tokenizer, name: str,
                    outtype: str) -> None:
    """Every hyper-parameter llama.cpp's command-r reads, the tokenizer, the chat template, palmkit's notes."""
    w.add_name(name)
    w.add_description(_summary(config))
    if langs := _languages(config):
        w.add_languages(langs)
    w.add_string("palmkit.config", json.dumps(config, ensure_ascii=False))  # the checkpoint's config.json
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    w.add_layer_norm_eps(cfg.norm_eps)
    w.add_logit_scale(cfg.d_model ** -0.5)  # section 2, "Shared embeddings": logits scaled by 1/sqrt(d)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(FILE_TYPES[outtype])

    tokens, scores, types = vocabulary(tokenizer, cfg.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    sp = tokenizer.sp
    w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    w.add_unk_token_id(sp.unk_id())
    w.add_pad_token_id(tokenizer.pad_id)
    if len(tokenizer.stop_ids) > 1:  # the chat template's <|end|>: end of turn, where chat replies stop
        w.add_eot_token_id(tokenizer.stop_ids[1])
    w.add_add_bos_token(tokenizer.add_bos)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)  # trained with add_dummy_prefix=False: no "▁" before the first word
    w.add_remove_extra_whitespaces(False)
    w.add_chat_template(jinja_template(tokenizer.add_bos, cut_markers=False))


def _add_tensors(w: gguf.GGUFWriter, state: dict[str, torch.Tensor], outtype: str, keep_int8: bool) -> None:
    """The weights under llama.cpp's names: 1-D ones in f32, 2-D ones in `outtype` (int8 ones kept as q8_0)."""
    if not keep_int8:
        state = dense_weights(state)
    for key in sorted(state):
        if key.endswith(".weight_scale"):
            continue
        value = state[key]
        name = gguf_name(key)
        if value.dtype == torch.int8:
            scale = state[key + "_scale"]
            if value.shape[1] % Q8_BLOCK == 0:
                w.add_tensor(name, q8_0_from_int8(value, scale), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                continue
            value = value.float() * scale.float()[:, None]  # rows q8_0 cannot block: dequantised, f16 below
        data = value.detach().float().numpy()
        kind = outtype if data.ndim == 2 else "f32"
        if kind == "q8_0" and data.shape[1] % Q8_BLOCK:
            kind = "f16"  # q8_0 needs rows in whole blocks of 32 (llama.cpp's quantizer falls back the same way)
        qtype = QTYPES[kind]
        if kind == "f32":
            w.add_tensor(name, data)
        elif kind == "f16":
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
