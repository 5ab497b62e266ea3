"""palmkit against llama.cpp on palmkit's GGUF exports: the worst log-probability difference over the whole
vocabulary per outtype, and perplexity per language (llama-perplexity beside palmkit computing it the same way).

    python benchmarks/gguf_parity.py      # builds llama.cpp first if it is not cached (palmkit.model.llamacpp)
    python benchmarks/gguf_parity.py --checkpoint runs/quickstart/model/final --corpus runs/quickstart/corpus

Without options the model is the one tests/model/test_gguf_export.py checks (the tiny preset trained for a few
dozen steps on the sample text of the seven corpus languages), so these are the margins under that test's
tolerances. With a checkpoint and its corpus: token ids of each language's validation documents, greedy
continuations of the quickstart's sample prompts (f32), and perplexity per language on the validation text
(n_ctx = --n_ctx, the first --chunks chunks), palmkit beside llama.cpp.
"""

import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _palmkit_ppl(model, ids: list[int], n_ctx: int, bos: int, n_chunks: int = 0) -> float:
    """Perplexity as llama-perplexity defines it: chunks of n_ctx tokens, each starting with BOS, scored on the
    second half (every scored token has at least n_ctx/2 tokens of context)."""
    nll, count, first = 0.0, 0, n_ctx // 2
    for start in range(0, (n_chunks or len(ids) // n_ctx) * n_ctx, n_ctx):
        chunk = [bos, *ids[start + 1:start + n_ctx]]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([chunk]))[0].double(), -1)
        targets = torch.tensor(chunk[first + 1:])
        nll -= float(logp[first:n_ctx - 1].gather(1, targets[:, None]).sum())
        count += n_ctx - 1 - first
    return math.exp(nll / count)


def _llama_perplexity(bin_dir: Path, model: Path, text: Path, n_ctx: int, n_chunks: int, threads: int = 2) -> float:
    """The perplexity llama-perplexity reports. Its logger is a thread that the program does not wait for at exit,
    so the last lines are sometimes lost: the report is its `Final estimate` or the running value after the last
    chunk (the same number), from another run when neither came out."""
    cmd = [str(bin_dir / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", str(n_ctx), "-b", str(n_ctx),
           "-t", str(threads), "--chunks", str(n_chunks)]
    for _ in range(5):
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        out = run.stdout + run.stderr
        assert run.returncode == 0, out[-3000:]
        found = re.search(r"Final estimate: PPL = ([0-9.]+)", out) or re.search(rf"\[{n_chunks}\]([0-9.]+)", out)
        if found:
            return float(found.group(1))
    raise AssertionError(f"no perplexity in llama-perplexity's output: {out[-3000:]}")


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
        _logprobs,
        _server_perplexity,
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
            if kind in ("f32", "q8_0"):  # the test's perplexity: llama-server's log-probabilities, 64 tokens
                row = []
                for lang, lines in LANGUAGES.items():
                    ids = tok.encode_prompt(" ".join(lines * 3))[:64]
                    theirs = _server_perplexity(server, ids, tok.vocab_size)
                    with torch.no_grad():
                        logp = torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)
                    ours = math.exp(-float(logp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).mean()))
                    row.append(f"{lang} {theirs / ours - 1:+.0e}")
                print(f"perplexity from llama-server's logprobs / palmkit - 1, {kind}: " + ", ".join(row), flush=True)
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


def checkpoint_parity(checkpoint: Path, corpus: Path, n_ctx: int, chunks: int, docs: int) -> None:
    import json

    import torch

    from palmkit.apps.quickstart import SAMPLE_PROMPTS
    from palmkit.infer.generate import generate_ids
    from palmkit.infer.sampling import SamplingParams
    from palmkit.model.checkpoint import load_checkpoint
    from palmkit.model.gguf_export import export_gguf
    from palmkit.model.llamacpp import llama_cpp_bin
    from tests.model.test_gguf_export import Server

    bin_dir = llama_cpp_bin()
    root = Path(tempfile.mkdtemp(prefix="gguf-parity-"))
    model, tok, _ = load_checkpoint(checkpoint, dtype=torch.float32)
    files = {t: export_gguf(checkpoint, root / f"{t}.gguf", outtype=t) for t in ("f32", "q8_0")}
    langs = sorted(p.name for p in (corpus / "text").iterdir() if (p / "valid.jsonl").is_file())
    valid = {lang: [json.loads(line)["text"] for line in (corpus / "text" / lang / "valid.jsonl").open()]
             for lang in langs}
    server = Server(bin_dir, files["f32"], root / "server.log")
    try:
        for lang in langs:
            texts = valid[lang][:docs]
            same = sum(server.post("/tokenize", {"content": t, "add_special": True})["tokens"] == tok.encode_prompt(t)
                       for t in texts)
            prompt = SAMPLE_PROMPTS.get(lang, "")
            ours = [s[0] for s in generate_ids(model, [tok.encode_prompt(prompt)], SamplingParams(
                max_new_tokens=48, temperature=0, stop_at_eos=False))]
            stops = [i for i, t in enumerate(ours) if t in tok.stop_ids]
            ours = ours[:stops[0] + 1] if stops else ours
            theirs = server.post("/completion", {"prompt": prompt, "n_predict": 48, "temperature": 0,
                                                 "return_tokens": True})["tokens"]
            print(f"{lang}: token ids equal on {same}/{len(texts)} validation documents; greedy continuation of "
                  f"{prompt!r} ({len(ours)} tokens) {'equal' if theirs == ours else 'DIFFERS'}", flush=True)
    finally:
        server.stop()
    for kind in ("f32", "q8_0"):
        row = []
        for lang in langs:
            text = "\n\n".join(valid[lang])
            ids = tok.encode_prompt(text)
            n = min(chunks, len(ids) // n_ctx)
            (root / f"valid-{lang}.txt").write_text(text, encoding="utf-8")
            theirs = _llama_perplexity(bin_dir, files[kind], root / f"valid-{lang}.txt", n_ctx, n)
            ours = _palmkit_ppl(model, ids, n_ctx, tok.bos_id, n)
            row.append(f"{lang} {ours:.2f}/{theirs:.2f} ({theirs / ours - 1:+.0e})")
        print(f"perplexity palmkit/llama.cpp, {kind}, n_ctx {n_ctx}, {chunks} chunks: " + ", ".join(row), flush=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a palmkit checkpoint (default: the test's tiny model)")
    parser.add_argument("--corpus", type=Path, help="its corpus folder (text/LANG/valid.jsonl)")
    parser.add_argument("--n_ctx", type=int, default=256)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--docs", type=int, default=200, help="validation documents per language to tokenize")
    args = parser.parse_args()
    if args.checkpoint:
        checkpoint_parity(args.checkpoint, args.corpus, args.n_ctx, args.chunks, args.docs)
    else:
        main()
