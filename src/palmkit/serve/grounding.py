"""FAQ grounding for `palmkit serve --faq`: FAQ files, BM25 retrieval and the grounding rule.

A FAQ file (question/answer pairs, CSV or JSONL) is indexed with BM25 (Robertson & Zaragoza 2009,
"The Probabilistic Relevance Framework: BM25 and Beyond"). For each question the k best-scoring entries
(DEFAULT_K = 1) that pass the grounding rule go into a system message right before the question:

    <|system|>Answer from these FAQ entries.
    Q: How do I reset my password?
    A: Click "Forgot password" on the sign-in page, ...<|end|>
    <|user|>I forgot my password<|end|>
    <|assistant|>

Grounding rule: an entry is relevant when the idf-weighted share of the question's terms that occur in it
(`coverage`) is at least `threshold`. A term the FAQ never uses gets the largest idf, so an off-topic
question ("What is the capital of France?") has most of its weight outside every entry and is not grounded.
Then the assistant answers with the fixed NO_ANSWER text without calling the model: it cannot invent one.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, CountVectorizer

from palmkit.data.scripts import CJK
from palmkit.errors import PalmkitError
from palmkit.io import decode_text, jsonl_rows

NO_ANSWER = ("I don't have an answer to that in our FAQ, so I won't guess. Please rephrase your question, "
             "or contact a human agent.")


SYSTEM_HEADER = "Answer from these FAQ entries."


# Entries in the prompt. One: the recipe's base model has a 256-token context and a few minutes of training,
# and copying the one answer in its prompt is the easiest thing it can learn; a stronger model can take more.
DEFAULT_K = 1


DEFAULT_THRESHOLD = 0.5


def default_faq() -> Path:
    """The demo FAQ shipped inside the package (a copy of examples/customer_service/faq.csv)."""
    return Path(str(resources.files("palmkit") / "assets" / "faq.csv"))


class FaqEntry(NamedTuple):
    """One question/answer pair; `where` is its file and line, shown as the answer's source."""

    question: str
    answer: str
    where: str = ""


def load_faq(path: str | os.PathLike) -> list[FaqEntry]:
    """The entries of a FAQ file: CSV with a header naming `question` and `answer` columns, or JSONL of
    {"question": ..., "answer": ...} objects. Blank lines are skipped; anything else malformed is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FAQ file not found: {path}")
    if path.suffix.lower() not in (".csv", ".jsonl", ".ndjson"):
        raise PalmkitError(f"{path}: a FAQ file must be .csv (question,answer columns) or .jsonl")
    text = decode_text(path.read_bytes(), name=path)  # strict: a FAQ answer must not be guessed at
    if not text.strip():
        raise PalmkitError(f"{path}: the file is empty")
    entries = _read_csv(path, text) if path.suffix.lower() == ".csv" else _read_jsonl(path, text)
    if not entries:
        raise PalmkitError(f"{path}: no FAQ entries after the header")
    return entries


def _entry(path: Path, line: int, question: object, answer: object) -> FaqEntry:
    for name, value in (("question", question), ("answer", answer)):
        if not isinstance(value, str):
            raise PalmkitError(f"{path}: line {line}: {name} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise PalmkitError(f"{path}: line {line}: empty {name}")
    return FaqEntry(" ".join(question.split()), " ".join(answer.split()), f"{path.name}:{line}")


def _read_csv(path: Path, text: str) -> list[FaqEntry]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip().lower() for h in next(reader)]
    missing = [c for c in ("question", "answer") if c not in header]
    if missing:
        raise PalmkitError(f"{path}: line 1: the CSV header must name 'question' and 'answer' columns "
                           f"(missing {', '.join(missing)}; found {', '.join(repr(h) for h in header)})")
    q, a = header.index("question"), header.index("answer")
    entries = []
    start = reader.line_num + 1  # a quoted field may span lines: a row's number is where it starts
    for row in reader:
        if any(cell.strip() for cell in row):
            if len(row) <= max(q, a):
                raise PalmkitError(f"{path}: line {start}: {len(row)} fields, expected {len(header)}")
            entries.append(_entry(path, start, row[q], row[a]))
        start = reader.line_num + 1
    return entries


def _read_jsonl(path: Path, text: str) -> list[FaqEntry]:
    entries = []
    for n, row in jsonl_rows(text, name=path):
        if not isinstance(row, dict) or "question" not in row or "answer" not in row:
            raise PalmkitError(f'{path}: line {n}: expected an object with "question" and "answer"')
        entries.append(_entry(path, n, row["question"], row["answer"]))
    return entries


# one term per Chinese/Japanese/Korean character (those scripts put no spaces between words), else words
_TERM = re.compile(f"[{CJK}]|[^\\W{CJK}]+")


_SUFFIXES = ("ing", "ed", "es", "s")


@functools.cache
def stop_words() -> frozenset[str]:
    # scikit-learn's list (from the Glasgow IR group) holds words that carry a support question's meaning
    keep = {"bill", "system", "call", "empty", "fire", "find", "name", "move", "show", "detail", "describe",
            "part", "full", "side", "top", "bottom", "front", "amount", "fill", "found", "back", "off", "on",
            "down", "up", "not", "no", "cannot", "cant", "first", "last", "interest", "keep", "never", "nothing"}
    # greetings and politeness say nothing about which entry is meant, and an unseen word weighs the most
    courtesy = {"hi", "hello", "hey", "thanks", "thank", "thx", "pls", "ok", "okay", "dear", "quick", "question"}
    return frozenset((ENGLISH_STOP_WORDS - keep) | courtesy)


def _stem(word: str) -> str:
    # A few English endings, so that "crashing" finds "crashes" and "files" finds "file"; Porter's stemmer does
    # this better but needs a dependency. Query and entries go through the same cut, so odd stems still match.
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3 and not word.endswith(("ss", "us", "is")):
            word = word[: -len(suffix)]
            break
    return word[:-1] if word.endswith("e") and len(word) > 3 else word


def terms(text: str) -> list[str]:
    """BM25 terms of a text: lowercased English words without stop words, lightly stemmed; one term per
    CJK character; words of other scripts as they are."""
    out, stop = [], stop_words()
    for match in _TERM.finditer(text.lower()):
        term = match.group()
        if term not in stop:
            out.append(_stem(term) if term.isascii() else term)
    return out


class BM25:
    """Okapi BM25 over a fixed set of documents, with Lucene's always-positive idf:
    idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5)); a term absent from every document has df = 0."""

    def __init__(self, documents: Sequence[str], k1: float = 1.5, b: float = 0.75):
        self.vectorizer = CountVectorizer(analyzer=terms)
        try:
            self.counts = self.vectorizer.fit_transform(documents).tocsc().astype(np.float64)
        except ValueError:  # sklearn: "empty vocabulary"
            raise PalmkitError("the FAQ has no words to search") from None
        self.k1, self.b = k1, b
        self.n = len(documents)
        df = np.diff(self.counts.indptr)  # CSC: the stored (non-zero) counts of each term's column
        self.idf = np.log1p((self.n - df + 0.5) / (df + 0.5))
        self.unseen_idf = math.log1p((self.n + 0.5) / 0.5)
        lengths = np.asarray(self.counts.sum(axis=1)).ravel()
        self.norm = k1 * (1 - b + b * lengths / lengths.mean())  # the length part of each document's denominator

    def _query(self, query: str) -> list[tuple[int | None, float]]:
        """(column or None when unseen, idf) of each distinct query term."""
        vocab = self.vectorizer.vocabulary_
        out = []
        for term in dict.fromkeys(terms(query)):
            j = vocab.get(term)
            out.append((j, self.unseen_idf if j is None else float(self.idf[j])))
        return out

    def _tf(self, j: int) -> np.ndarray:
        return self.counts[:, j].toarray().ravel()

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document: sum over distinct query terms of idf * tf (k1 + 1) / (tf + norm)."""
        total = np.zeros(self.n)
        for j, idf in self._query(query):
            if j is not None:
                tf = self._tf(j)
                total += idf * tf * (self.k1 + 1) / (tf + self.norm)
        return total

    def coverage(self, query: str) -> np.ndarray:
        """For every document, the idf-weighted share of the query's distinct terms that occur in it."""
        query_terms = self._query(query)
        weight = sum(idf for _, idf in query_terms)
        covered = np.zeros(self.n)
        for j, idf in query_terms:
            if j is not None:
                covered += idf * (self._tf(j) > 0)
        return covered / weight if weight else covered


@dataclass
class Hit:
    """A retrieved entry with its BM25 score and coverage of the question."""

    entry: FaqEntry
    score: float
    coverage: float

    def source(self) -> dict:
        return {"question": self.entry.question, "answer": self.entry.answer, "where": self.entry.where,
                "score": round(self.score, 4), "coverage": round(self.coverage, 4)}


class FaqIndex:
    """Searchable FAQ entries (question and answer indexed together) and the grounding rule."""

    def __init__(self, entries: Sequence[FaqEntry], k: int = DEFAULT_K, threshold: float = DEFAULT_THRESHOLD,
                 name: str = "FAQ"):
        if not entries:
            raise PalmkitError("the FAQ has no entries")
        if k < 1 or not 0 < threshold <= 1:
            raise PalmkitError(f"need k >= 1 and 0 < threshold <= 1, got k={k}, threshold={threshold}")
        self.entries, self.k, self.threshold, self.name = list(entries), k, threshold, name
        self.bm25 = BM25([f"{e.question} {e.answer}" for e in self.entries])

    @classmethod
    def from_file(cls, path: str | os.PathLike, k: int = DEFAULT_K,
                  threshold: float = DEFAULT_THRESHOLD) -> FaqIndex:
        return cls(load_faq(path), k, threshold, name=Path(path).name)

    def search(self, question: str, k: int | None = None) -> list[Hit]:
        """The k best entries by BM25 (ties: file order), those with a positive score only."""
        scores, coverage = self.bm25.scores(question), self.bm25.coverage(question)
        order = np.argsort(-scores, kind="stable")[: k or self.k]
        return [Hit(self.entries[i], float(scores[i]), float(coverage[i])) for i in order if scores[i] > 0]

    def relevant(self, question: str) -> list[Hit]:
        """The entries that ground an answer: the k best that pass the coverage threshold; [] if none does."""
        return [h for h in self.search(question) if h.coverage >= self.threshold]


def system_message(hits: Sequence[Hit]) -> str:
    """The system message that carries the retrieved entries, best first."""
    return "\n".join([SYSTEM_HEADER, *(f"Q: {h.entry.question}\nA: {h.entry.answer}" for h in hits)])


@dataclass
class Grounding:
    """A conversation prepared for the model, or the reason it must not be sent to it."""

    messages: list[dict]  # the system message with the entries placed just before the last user message
    hits: list[Hit]

    @property
    def grounded(self) -> bool:
        return bool(self.hits)

    def info(self) -> dict:
        """What a response says about its grounding (the `faq` field of the server's answers)."""
        return {"grounded": self.grounded, "sources": [h.source() for h in self.hits]}


def ground(index: FaqIndex, messages: Sequence[dict],
           fits: Callable[[list[dict]], bool] | None = None) -> Grounding:
    """Retrieve for the last user message and insert the entries right before it, as in training.
    fits(messages): whether a prompt leaves room to answer; the weakest entries are dropped until it does
    (down to one: a prompt still too long is the caller's error to report)."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last is None:
        raise PalmkitError("a grounded conversation needs a user message")
    hits = index.relevant(messages[last]["content"])
    while True:
        out = list(messages)
        if hits:
            out.insert(last, {"role": "system", "content": system_message(hits)})
        if len(hits) <= 1 or fits is None or fits(out):
            return Grounding(out, hits)
        hits = hits[:-1]
