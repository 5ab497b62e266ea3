"""The main job on embedded defaults: corpus subset -> tokenizer -> pretraining -> evaluation -> samples."""

from __future__ import annotations

import time
from pathlib import Path

from palmkit.data.corpus.build import build
from palmkit.data.corpus.sources import fetch
from palmkit.data.shards import unigram_perplexity
from palmkit.infer.generate import generate
from palmkit.infer.sampling import SamplingParams
from palmkit.io import split_list
from palmkit.model.checkpoint import load_checkpoint
from palmkit.train.config import TrainConfig
from palmkit.train.metrics import read_metrics
from palmkit.train.pretrain import pretrain

SAMPLE_PROMPTS = {"en": "The company said", "de": "Die Datei wird", "zh": "中国人民", "fr": "Le fichier",
                  "es": "El programa", "ru": "Эта программа", "ja": "このコマンドは"}


def quickstart(out: str = "runs/quickstart", minutes: float = 10.0, preset: str = "small",
               langs: list[str] | str = "en,zh,de,fr,es,ru,ja", vocab_size: int = 16000, seq_len: int = 256,
               batch_tokens: int = 8192, lr: float = 3e-3, eval_every: int = 50, compile: bool = True,
               seed: int = 0, cache: str = "") -> str:
    """Fetch a small multilingual corpus, train a tokenizer, pretrain for MINUTES, then evaluate and sample.

    Everything lands in OUT: corpus/ (text, report, tokenizer, shards), model/ (checkpoints, metrics.jsonl,
    loss.png, final/) and summary.md with per-language perplexity against a unigram baseline. Running it again
    reuses the corpus and resumes the training.

    Args:
        out: folder of the whole run
        minutes: training time; the learning rate decays over it, however fast the machine is
        preset: model size (`palmkit info --preset NAME` counts one)
        langs: languages of the corpus: a list, or one comma-separated string
        vocab_size: pieces of the SentencePiece tokenizer
        seq_len: tokens per training sequence
        batch_tokens: tokens per optimiser step
        lr: peak learning rate
        eval_every: steps between validations
        compile: torch.compile the model (slower to start, faster steps)
        seed: seed of the corpus split, the tokenizer sample, the weights and the samples
        cache: folder of the downloaded sources (default: $PALMKIT_CACHE, else ~/.cache/palmkit/corpus)
    """
    out_dir = Path(out)
    corpus_dir = out_dir / "corpus"
    langs = split_list(langs)
    started = time.perf_counter()
    fetch_kwargs = {"cache": cache} if cache else {}
    fetch(langs=langs, subset="small", **fetch_kwargs)
    if not (corpus_dir / "shards").is_dir():
        build(out=str(corpus_dir), langs=langs, subset="small", vocab_size=vocab_size, seed=seed,
                         **fetch_kwargs)
    prep = time.perf_counter() - started
    # A timed run: the cosine decays over MINUTES of training, however fast this machine turns out to be.
    # lr 3e-3 rather than pretrain's 2e-3: a run of minutes learnt faster with the larger step (benchmarks/README.md,
    # "Quickstart learning rate").
    print(f"training {preset} for {minutes:g} min")
    options = TrainConfig(preset=preset, seq_len=seq_len, batch_tokens=batch_tokens, max_steps=0, max_minutes=minutes,
                          warmup_steps=10, lr=lr, eval_every=eval_every, eval_sequences=32, save_every=50,
                          compile=compile, seed=seed)
    metrics = pretrain(str(corpus_dir), str(out_dir / "model"), options, resume=True)
    model, tokenizer, _ = load_checkpoint(out_dir / "model" / "final")
    rows = ["| language | validation perplexity | unigram baseline | bits per byte |", "|---|---|---|---|"]
    for lang in sorted({k.split("/")[1] for k in metrics if k.startswith("val/")}):
        rows.append(f"| {lang} | {metrics[f'val/{lang}/ppl']:.1f} | {unigram_perplexity(corpus_dir, lang):.1f} | "
                    f"{metrics[f'val/{lang}/bpb']:.3f} |")
    samples = []
    for lang in [x for x in ("en", "de", "zh") if x in langs] or langs[:3]:
        prompt = SAMPLE_PROMPTS.get(lang, "")
        text = generate(model, tokenizer, prompt, SamplingParams(max_new_tokens=48, temperature=0.8, top_p=0.95,
                                                                  seed=seed))[0].text
        samples.append(f"**{lang}**: {prompt}{text}".replace("\n", " "))
    train_records = [r for r in read_metrics(out_dir / "model" / "metrics.jsonl") if "loss" in r]
    summary = "\n".join([
        "# palmkit quickstart", "",
        f"Corpus and tokenizer: {prep / 60:.1f} min; training: {len(train_records) and train_records[-1]['step']} "
        f"steps of {batch_tokens} tokens, final training loss {metrics.get('loss', float('nan')):.3f}.", "",
        *rows, "", "## Samples (temperature 0.8, top-p 0.95)", "", *[s + "\n" for s in samples],
        f"Loss plot: {out_dir / 'model' / 'loss.png'}", f"Model: {out_dir / 'model' / 'final'}",
        f"Corpus report: {corpus_dir / 'report.md'}", "",
        f"Next: palmkit generate --checkpoint {out_dir / 'model' / 'final'} --prompt 'The'",
    ])
    (out_dir / "summary.md").write_text(summary + "\n", encoding="utf-8")
    return summary
