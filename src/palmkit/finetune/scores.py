"""Pure metrics: classification scores and reports, BIO entity extraction and entity F1."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support
from sklearn.metrics import classification_report as sk_report

from palmkit.errors import PalmkitError


def classification_scores(y_true: Sequence[int], y_pred: Sequence[int], n_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 (scikit-learn's definitions)."""
    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro", labels=list(range(n_labels)),
                                       zero_division=0))}


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
        raise PalmkitError(f"{len(true)} gold sentences but {len(pred)} predicted")
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


def classification_report(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict:
    """scikit-learn's per-class report plus micro averages, accuracy and the confusion matrix."""
    report = plain(sk_report(y_true, y_pred, labels=list(labels), output_dict=True, zero_division=0))
    report.pop("accuracy", None)
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=list(labels), average="micro",
                                                 zero_division=0)
    report["micro avg"] = {"precision": float(p), "recall": float(r), "f1-score": float(f), "support": len(y_true)}
    return {"per_class": {k: v for k, v in report.items() if k in labels},
            "averages": {k: report[k] for k in ("macro avg", "micro avg", "weighted avg")},
            "accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(report["macro avg"]["f1-score"]),
            "confusion": confusion_matrix(y_true, y_pred, labels=list(labels)).tolist()}


def plain(obj):
    """scikit-learn's report with numpy scalars turned into Python numbers (for JSON)."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    return obj.item() if hasattr(obj, "item") else obj
