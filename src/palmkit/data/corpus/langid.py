"""The language of each document of the user's inputs (`--lang auto`), by py3langid.

py3langid (Lui and Baldwin, 2012, "langid.py: An Off-the-shelf Language Identification Tool") is a naive Bayes
model over byte n-grams of 140 languages that ships inside its wheel, so that nothing is downloaded at run time. It
reads the first SAMPLE_CHARS characters of a document (its time grows with the text, its answer hardly does), and
a document whose most likely language has a probability under MIN_CONFIDENCE is not given one: it is listed in
rejected.jsonl with the language and probability. How it compares with lingua on the shipped corpus is in
benchmarks/README.md ("Language identification").
"""

from __future__ import annotations

import functools

from py3langid.langid import MODEL_FILE, LanguageIdentifier

SAMPLE_CHARS = 1000


MIN_CONFIDENCE = 0.5


@functools.cache
def _identifier() -> LanguageIdentifier:
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def known_languages() -> frozenset[str]:
    """The language codes the model knows (ISO 639-1 where there is one, e.g. en, de, zh, ja)."""
    return frozenset(_identifier().nb_classes)


def identify(text: str) -> tuple[str, float]:
    """(language code, probability) of a text."""
    code, p = _identifier().classify(text[:SAMPLE_CHARS])
    return str(code), float(p)
