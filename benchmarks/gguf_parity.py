"""palmkit against llama.cpp on palmkit's GGUF exports: the worst log-probability difference over the whole
vocabulary per outtype, and perplexity per language (llama-perplexity beside palmkit computing it the same way).

    python benchmarks/gguf_parity.py      # builds llama.cpp first if it is not cached (palmkit.model.llamacpp)

The model is the one tests/model/test_gguf_export.py checks (the tiny preset trained for a few dozen steps on the
sample text of the seven corpus languages), so these are the margins under that test's tolerances.
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch

    from palmkit.model.checkpoint import load_checkpoint, save_checkpoint
    from palmkit.model.gguf_export import export_gguf
    from palmkit.model.llamacpp import llama_cpp_bin
    from palmkit.model.quant import quantize_int8
    from palmkit.model.tokenizer import train_tokenizer
    from tests.conftest import random_model
    from tests.model.test_gguf_export import (
        LANGUAGES,
        LINES,
        TEXTS,
        Server,
        _dense,
        _llama_logprobs,
        _llama_perplexity,
        _logprobs,
        _palmkit_ppl,
        _train,
    )

    bin_dir = llama_cpp_bin()
    root = Path(tempfile.mkdtemp(prefix="gguf-parity-"))
    tok = train_tokenizer(LINES * 4, root / "tokenizer.model", vocab_size=600)
    torch.manual_seed(0)
    save_checkpoint(root / "ckpt", _train(random_model(tok.vocab_size, seed=3, rope_theta=5000.0), tok), tok)
    model, tok, _ = load_checkpoint(root / "ckpt")
    save_checkpoint(root / "int8", quantize_int8(load_checkpoint(root / "ckpt")[0]), tok)
    files = {t: export_gguf(root / "ckpt", root / f"{t}.gguf", outtype=t) for t in ("f32", "f16", "bf16", "q8_0")}
    files["int8"] = export_gguf(root / "int8", root / "int8.gguf")
    for kind, path in files.items():
        ref = _dense(load_checkpoint(root / "int8")[0]) if kind == "int8" else model
        server = Server(bin_dir, path, root / f"server-{kind}.log")
        try:
            worst = 0.0
            for text in TEXTS.values():
                ids = tok.encode_prompt(text)
                ours, theirs = _logprobs(ref, ids), _llama_logprobs(server, ids, tok.vocab_size)
                keep = ours > -30
                worst = max(worst, float((ours - theirs)[keep].abs().max()))
        finally:
            server.stop()
        print(f"logprob max |llama.cpp - palmkit|, {kind}: {worst:.1e}", flush=True)
    n_ctx = 32
    for kind in ("f32", "q8_0"):
        row = []
        for lang, lines in LANGUAGES.items():
            text = " ".join(lines)
            while len(tok.encode_prompt(text)) < 3 * n_ctx:
                text += " " + " ".join(lines)
            (root / f"valid-{lang}.txt").write_text(text, encoding="utf-8")
            ids = tok.encode_prompt(text)
            theirs = _llama_perplexity(bin_dir, files[kind], root / f"valid-{lang}.txt", n_ctx, len(ids) // n_ctx)
            ours = _palmkit_ppl(model, ids, n_ctx, tok.bos_id)
            row.append(f"{lang} {ours:.2f}/{theirs:.2f} ({theirs / ours - 1:+.0e})")
        print(f"perplexity palmkit/llama.cpp, {kind}: " + ", ".join(row), flush=True)


if __name__ == "__main__":
    main()
