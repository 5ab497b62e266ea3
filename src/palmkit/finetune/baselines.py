"""Baselines beside the model: TF-IDF + logistic regression and the most frequent tag per word."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

from palmkit.data.scripts import CJK
from palmkit.data.tasks import LabelledText, TaggedSentence

_CJK = re.compile(f"[{CJK}]")


def needs_char_ngrams(texts: Sequence[str]) -> bool:
    """True for text mostly in scripts written without spaces (Chinese, Japanese): word n-grams fail there."""
    sample = "".join(texts[:500])
    letters = sum(ch.isalpha() for ch in sample)
    return bool(letters) and len(_CJK.findall(sample)) / letters > 0.3


def tfidf_baseline(train: Sequence[LabelledText], char_ngrams: bool, seed: int = 0):
    """A TF-IDF + logistic-regression pipeline fitted on `train` (char 1-3-grams, or word 1-2-grams)."""
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
