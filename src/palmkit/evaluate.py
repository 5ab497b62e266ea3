"""Evaluation of fine-tuned models on held-out data, beside baselines that need no language model.

    palmkit evaluate --checkpoint runs/sst                     # the task it was tuned on, test split
    palmkit evaluate --checkpoint runs/sst --eval-tasks sentiment-fr,sentiment-de,sentiment-zh

Classifiers get scikit-learn's classification report (per class precision, recall, F1 and support; macro,
micro and weighted averages), a confusion-matrix PNG, and the same report for a TF-IDF + logistic
regression baseline trained on the same training split (character n-grams for Chinese and Japanese), so
the report shows what the language model adds. In zero-shot transfer (`--eval-tasks`) the baseline is the
one trained on the fine-tuning language too. Taggers get entity-level precision, recall and F1 per type
(an entity counts only if its type and both boundaries match, as in CoNLL's conlleval) beside a
baseline that gives each word its most frequent training tag. Results: report.md and report.json.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from palmkit.checkpoint import atomic_write_bytes, atomic_write_json, load_config
from palmkit.errors import PalmkitError
from palmkit.metrics import plt
from palmkit.tasks import LabelledText, TaggedSentence, TaskData, load_task, load_user_task, subsample

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff\uac00-\ud7af]")


def needs_char_ngrams(texts: Sequence[str]) -> bool:
    """True for text mostly in scripts written without spaces (Chinese, Japanese): word n-grams fail there."""
    sample = "".join(texts[:500])
    letters = sum(ch.isalpha() for ch in sample)
    return bool(letters) and len(_CJK.findall(sample)) / letters > 0.3


# --------------------------------------------------------------------------------------------------
# Entity-level scores


def extract_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, first, last) word spans of a BIO/IOB2 tag sequence, last inclusive.

    As in conlleval, an I- tag that does not continue an entity of its type starts a new one.
    """
    spans = []
    start, etype = None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, name = tag.partition("-")
        continues = prefix == "I" and etype == name and start is not None
        if start is not None and not continues:
            spans.append((etype, start, i - 1))
            start, etype = None, None
        if prefix in ("B", "I") and not continues:
            start, etype = i, name
    return spans


def _prf(tp: int, n_pred: int, n_true: int) -> dict[str, float]:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_true if n_true else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "support": n_true}


def entity_scores(true: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict:
    """Entity precision, recall, F1 and support per type, micro-averaged (over all entities) and macro."""
    if len(true) != len(pred):
        raise ValueError(f"{len(true)} gold sentences but {len(pred)} predicted")
    tp: Counter = Counter()
    n_true: Counter = Counter()
    n_pred: Counter = Counter()
    for t, p in zip(true, pred, strict=True):
        gold, guess = set(extract_entities(t)), set(extract_entities(p))
        n_true.update(e[0] for e in gold)
        n_pred.update(e[0] for e in guess)
        tp.update(e[0] for e in gold & guess)
    types = sorted(set(n_true) | set(n_pred))
    per_type = {k: _prf(tp[k], n_pred[k], n_true[k]) for k in types}
    micro = _prf(sum(tp.values()), sum(n_pred.values()), sum(n_true.values()))
    macro = {m: sum(s[m] for s in per_type.values()) / len(per_type) if per_type else 0.0
             for m in ("precision", "recall", "f1")}
    return {"per_type": per_type, "micro": micro, "macro": {**macro, "support": micro["support"]}}


# --------------------------------------------------------------------------------------------------
# Baselines


def tfidf_baseline(train: Sequence[LabelledText], char_ngrams: bool, seed: int = 0):
    """A TF-IDF + logistic-regression pipeline fitted on `train` (char 1-3-grams, or word 1-2-grams)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    vec = (TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True, min_df=2) if char_ngrams
           else TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1))
    pipe = make_pipeline(vec, LogisticRegression(max_iter=2000, C=4.0, random_state=seed))
    return pipe.fit([ex.text for ex in train], [ex.label for ex in train])


def most_frequent_tag_baseline(train: Sequence[TaggedSentence]):
    """A tagger that gives each word its most frequent training tag (O for unseen words)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for s in train:
        for w, t in zip(s.tokens, s.tags, strict=True):
            counts[w][t] += 1
    best = {w: c.most_common(1)[0][0] for w, c in counts.items()}
    return lambda sentences: [[best.get(w, "O") for w in s] for s in sentences]


# --------------------------------------------------------------------------------------------------
# Reports


def classification_report(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict:
    """scikit-learn's per-class report plus micro averages, accuracy and the confusion matrix."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support
    from sklearn.metrics import classification_report as sk_report

    report = _plain(sk_report(y_true, y_pred, labels=list(labels), output_dict=True, zero_division=0))
    report.pop("accuracy", None)
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=list(labels), average="micro",
                                                 zero_division=0)
    report["micro avg"] = {"precision": float(p), "recall": float(r), "f1-score": float(f), "support": len(y_true)}
    return {"per_class": {k: v for k, v in report.items() if k in labels},
            "averages": {k: report[k] for k in ("macro avg", "micro avg", "weighted avg")},
            "accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(report["macro avg"]["f1-score"]),
            "confusion": confusion_matrix(y_true, y_pred, labels=list(labels)).tolist()}


def _plain(obj):
    """scikit-learn's report with numpy scalars turned into Python numbers (for JSON)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj.item() if hasattr(obj, "item") else obj


def confusion_png(matrix: Sequence[Sequence[int]], labels: Sequence[str], path: Path, title: str) -> Path:
    """The confusion matrix as an annotated heat map (rows: true class, columns: predicted)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(4.0, 1.0 + 0.9 * len(labels))
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(labels)).plot(ax=ax, colorbar=False,
                                                                                 cmap="Blues", values_format="d")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
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


# --------------------------------------------------------------------------------------------------
# The command


def _rebuild(config: dict, kind: str, seed: int) -> TaskData:
    """The fine-tuning task's splits, as the checkpoint's config.json describes them."""
    files = config.get("data_files") or {}
    if files.get("train"):
        return load_user_task(kind, files["train"], files.get("valid", ""), files.get("test", ""),
                              files.get("text_field", "text"), files.get("label_field", ""), seed)
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
    names = list(dict.fromkeys([task or trained.name, *(t for part in eval_tasks or [] for t in part.split(",") if t)]))
    targets = [trained if n == trained.name else load_task(n, seed=seed) for n in names]
    out_dir = Path(out) if out else path / "eval"
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
    from palmkit.finetune import load_classifier

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
    from palmkit.finetune import load_tagger

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


@torch.no_grad()
def _evaluate_chat(path: Path, config: dict, data: TaskData, split: str, max_examples: int, seed: int,
                   result: dict) -> None:
    from palmkit.checkpoint import load_checkpoint
    from palmkit.finetune import batches, chat_item, collate
    from palmkit.model import lm_loss

    model, tokenizer, _ = load_checkpoint(path)
    max_len = int(config.get("max_len", model.config.max_seq_len))
    items = [chat_item(tokenizer, c, max_len, config.get("chat_template"))
             for c in subsample(data.split(split), max_examples, seed)]
    items = [it for it in items if any(t != -100 for t in it.target)]
    total = count = 0.0
    for batch in batches(items, 32):
        ids, _, targets = collate(batch, tokenizer.pad_id)
        n = int((targets != -100).sum())
        total += lm_loss(model(ids), targets, 0.0)[1].item() * n
        count += n
    loss = total / max(count, 1)
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


def evaluate_command(checkpoint: str, task: str = "", eval_tasks: list[str] | None = None, out: str = "",
                     split: str = "test", max_examples: int = 0, baseline: bool = True) -> str:
    """Evaluate a fine-tuned checkpoint on its task (and others zero-shot) beside a baseline; prints report.md.

    --task evaluates on another task than the one it was tuned on; --eval-tasks adds tasks (zero-shot when they
    differ from the tuning task: labels must carry the same names). Baselines always learn from the tuning task's
    training examples. Writes report.md, report.json and confusion-matrix PNGs to OUT (default CHECKPOINT/eval).
    """
    result = evaluate(checkpoint, task, eval_tasks, out, split, max_examples, baseline)
    return render_markdown(result) + f"\n\n(written to {Path(out) if out else Path(checkpoint) / 'eval'})"

