"""`palmkit evaluate`: classification reports, confusion matrices, entity F1 and baselines beside the model,
on the task a model was tuned on and, zero-shot, on others (cross-lingual transfer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay
from tqdm import tqdm

from palmkit.data.tasks import TaskData, TaskFiles, load_task, subsample
from palmkit.errors import PalmkitError
from palmkit.finetune.baselines import most_frequent_tag_baseline, needs_char_ngrams, tfidf_baseline
from palmkit.finetune.encode import chat_items, lm_batches
from palmkit.finetune.predict import load_classifier, load_tagger
from palmkit.finetune.scores import classification_report, entity_scores
from palmkit.io import atomic_write_bytes, atomic_write_json, claim_names, split_list
from palmkit.model.checkpoint import load_checkpoint, load_config
from palmkit.train.lm_eval import mean_lm_loss


def confusion_png(matrix: Sequence[Sequence[int]], labels: Sequence[str], path: Path, title: str) -> Path:
    """The confusion matrix as an annotated heat map (rows: true class, columns: predicted)."""
    size = max(4.0, 1.0 + 0.9 * len(labels))
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(labels)).plot(ax=ax, colorbar=False,
                                                                                 cmap="Blues", values_format="d")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _class_table(report: dict) -> list[str]:
    rows = ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name, r in [*report["per_class"].items(), *report["averages"].items()]:
        rows.append(f"| {name} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1-score']:.3f} | "
                    f"{int(r['support'])} |")
    return rows


def _entity_table(scores: dict) -> list[str]:
    rows = ["| entity type | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name, r in [*scores["per_type"].items(), ("micro avg", scores["micro"]), ("macro avg", scores["macro"])]:
        rows.append(f"| {name} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {int(r['support'])} |")
    return rows


def _rebuild(config: dict, kind: str, seed: int) -> TaskData:
    """The fine-tuning task's splits, as the checkpoint's config.json describes them."""
    files = config.get("data_files") or {}
    if files.get("train"):
        return TaskFiles.from_record(files).load(kind, seed)
    return load_task(config["data"], seed=seed)


def evaluate(checkpoint: str, task: str = "", eval_tasks: list[str] | None = None, out: str = "",
             split: str = "test", max_examples: int = 0, baseline: bool = True) -> dict:
    """Evaluate a fine-tuned classifier or tagger; writes report.md, report.json and PNGs to OUT."""
    path = Path(checkpoint)
    config = load_config(path)
    kind = config.get("task")
    if kind not in ("classify", "ner", "chat"):
        raise PalmkitError(f"{path} is not a fine-tuned checkpoint (config.json has no task): "
                           "run `palmkit finetune` first")
    tuning = config.get("finetune", {})
    seed = int(tuning.get("seed", 0))
    trained = _rebuild(config, kind, seed)
    # Baselines learn from exactly the training examples the model saw (fine-tuning may subsample them)
    train = subsample(trained.train, int(tuning.get("max_train", 0)), seed)
    names = list(dict.fromkeys([task or trained.name, *split_list(eval_tasks or [])]))
    targets = [trained if n == trained.name else load_task(n, seed=seed) for n in names]
    out_dir = Path(out) if out else path / "eval"
    if not out and not out_dir.exists():  # palmkit makes it: the model folder's manifest says so
        claim_names(path, [out_dir.name])
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"checkpoint": str(path), "kind": kind, "trained_on": trained.name, "split": split,
                    "train_examples": len(train), "tasks": {}}
    if kind == "classify":
        _evaluate_classifier(path, trained, train, targets, split, max_examples, baseline, seed, out_dir, result)
    elif kind == "ner":
        _evaluate_tagger(path, trained, train, targets, split, max_examples, baseline, seed, result)
    else:
        _evaluate_chat(path, config, targets[0], split, max_examples, seed, result)
    atomic_write_json(out_dir / "report.json", result)
    atomic_write_bytes(out_dir / "report.md", (render_markdown(result) + "\n").encode())
    return result


def _evaluate_classifier(path: Path, trained: TaskData, train: list, targets: list[TaskData], split: str,
                         max_examples: int, baseline: bool, seed: int, out_dir: Path, result: dict) -> None:

    clf = load_classifier(path)
    base = tfidf_baseline(train, needs_char_ngrams([ex.text for ex in train]), seed) if baseline else None
    for data in targets:
        examples = subsample(data.split(split), max_examples, seed)
        unknown = sorted({ex.label for ex in examples} - set(clf.labels))
        if unknown:
            raise PalmkitError(f"{data.name} has label(s) {', '.join(unknown)} that the classifier lacks "
                               f"({', '.join(clf.labels)})")
        texts, gold = [ex.text for ex in examples], [ex.label for ex in examples]
        entry: dict = {"lang": data.lang, "examples": len(examples), "zero_shot": data.name != trained.name,
                       "model": classification_report(gold, [p for p, _ in clf.predict(texts)], clf.labels)}
        png = confusion_png(entry["model"]["confusion"], clf.labels, out_dir / f"confusion_{data.name}.png",
                            f"{path.name} on {data.name} ({split})")
        entry["confusion_png"] = png.name
        if base is not None:
            entry["baseline"] = classification_report(gold, list(base.predict(texts)), clf.labels)
        result["tasks"][data.name] = entry


def _evaluate_tagger(path: Path, trained: TaskData, train: list, targets: list[TaskData], split: str,
                     max_examples: int, baseline: bool, seed: int, result: dict) -> None:

    tagger = load_tagger(path)
    base = most_frequent_tag_baseline(train) if baseline else None
    for data in targets:
        sentences = subsample(data.split(split), max_examples, seed)
        gold = [s.tags for s in sentences]
        entry: dict = {"lang": data.lang, "examples": len(sentences), "zero_shot": data.name != trained.name,
                       "model": entity_scores(gold, tagger.tag_words([s.tokens for s in sentences]))}
        if base is not None:
            entry["baseline"] = entity_scores(gold, base([s.tokens for s in sentences]))
        result["tasks"][data.name] = entry


def _evaluate_chat(path: Path, config: dict, data: TaskData, split: str, max_examples: int, seed: int,
                   result: dict) -> None:

    model, tokenizer, _ = load_checkpoint(path)
    max_len = int(config.get("max_len", model.config.max_seq_len))
    items = chat_items(tokenizer, subsample(data.split(split), max_examples, seed), max_len,
                       config.get("chat_template"))
    progress = tqdm(lm_batches(items, 32, tokenizer.pad_id), total=math.ceil(len(items) / 32), unit="batch",
                    desc=f"evaluate {data.name}", leave=False, dynamic_ncols=True)
    loss, count = mean_lm_loss(model, progress)
    result["tasks"][data.name] = {"lang": data.lang, "examples": len(items), "zero_shot": False,
                                  "model": {"assistant_loss": loss, "assistant_ppl": math.exp(min(loss, 50)),
                                            "assistant_tokens": int(count)}}


def render_markdown(result: dict) -> str:
    """report.md from report.json's content."""
    lines = [f"# Evaluation of `{result['checkpoint']}`", "",
             f"Fine-tuned on **{result['trained_on']}**; {result['split']} split."]
    tasks = result["tasks"]
    if result["kind"] == "classify":
        lines += ["", "| task | examples | zero-shot | model accuracy | model macro-F1 | baseline accuracy | "
                      "baseline macro-F1 |", "|---|---|---|---|---|---|---|"]
        for name, e in tasks.items():
            b = e.get("baseline", {})
            lines.append(f"| {name} | {e['examples']} | {'yes' if e['zero_shot'] else 'no'} | "
                         f"{e['model']['accuracy']:.3f} | {e['model']['macro_f1']:.3f} | "
                         f"{b.get('accuracy', math.nan):.3f} | {b.get('macro_f1', math.nan):.3f} |")
        lines += ["", f"Baseline: TF-IDF + logistic regression trained on the same {result['train_examples']} "
                      f"training examples of {result['trained_on']} as the model, applied unchanged to every task."]
        for name, e in tasks.items():
            lines += ["", f"## {name}", "", "Model:", "", *_class_table(e["model"])]
            if "baseline" in e:
                lines += ["", "TF-IDF + logistic-regression baseline:", "", *_class_table(e["baseline"])]
            lines += ["", f"![confusion matrix]({e['confusion_png']})"]
    elif result["kind"] == "ner":
        lines += ["", "| task | sentences | model F1 | baseline F1 |", "|---|---|---|---|"]
        for name, e in tasks.items():
            lines.append(f"| {name} | {e['examples']} | {e['model']['micro']['f1']:.3f} | "
                         f"{e.get('baseline', {}).get('micro', {}).get('f1', math.nan):.3f} |")
        lines += ["", "Entity-level scores (type and both boundaries must match). Baseline: each word's most "
                      f"frequent tag in the same {result['train_examples']} training sentences as the model."]
        for name, e in tasks.items():
            lines += ["", f"## {name}", "", "Model:", "", *_entity_table(e["model"])]
            if "baseline" in e:
                lines += ["", "Most-frequent-tag baseline:", "", *_entity_table(e["baseline"])]
    else:
        for name, e in tasks.items():
            m = e["model"]
            lines += ["", f"{name}: {e['examples']} conversations, loss on assistant tokens {m['assistant_loss']:.3f} "
                          f"(perplexity {m['assistant_ppl']:.1f}, {m['assistant_tokens']} tokens)"]
    return "\n".join(lines)
