"""Customer-service assistant (issue 8): FAQ retrieval, grounded prompts, the tuning data and the recipe.

A user's FAQ file (question/answer pairs, CSV or JSONL) is indexed with BM25 (Robertson & Zaragoza 2009,
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

`palmkit recipe support` tunes a base model on chat data (chatterbot-corpus English and chitchat, task
`dialogue-en`) plus grounded examples in exactly the format above, built from the FAQ itself and from
chatterbot Q/A pairs used as a pseudo-FAQ, so that the model learns to answer from the retrieved entry (a
base model trained for minutes mostly learns the FAQ's own answers: tune again when the FAQ changes).
`palmkit serve --checkpoint CKPT --faq FILE` then grounds every /v1/chat/completions request and the web page at `/`.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np

from palmkit.errors import PalmkitError

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


# --------------------------------------------------------------------------------------------------
# FAQ files


class FaqEntry(NamedTuple):
    """One question/answer pair; `where` is its file and line, shown as the answer's source."""

    question: str
    answer: str
    where: str = ""


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise PalmkitError(f"{path}: line {line} is not valid UTF-8 (byte {exc.start}); save the file as UTF-8"
                           ) from None


def load_faq(path: str | os.PathLike) -> list[FaqEntry]:
    """The entries of a FAQ file: CSV with a header naming `question` and `answer` columns, or JSONL of
    {"question": ..., "answer": ...} objects. Blank lines are skipped; anything else malformed is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FAQ file not found: {path}")
    if path.suffix.lower() not in (".csv", ".jsonl", ".ndjson"):
        raise PalmkitError(f"{path}: a FAQ file must be .csv (question,answer columns) or .jsonl")
    text = _decode(path)
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
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PalmkitError(f"{path}: line {n} is not JSON: {exc}") from None
        if not isinstance(row, dict) or "question" not in row or "answer" not in row:
            raise PalmkitError(f'{path}: line {n}: expected an object with "question" and "answer"')
        entries.append(_entry(path, n, row["question"], row["answer"]))
    return entries


# --------------------------------------------------------------------------------------------------
# BM25


_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
# one term per Chinese/Japanese/Korean character (those scripts put no spaces between words), else words
_TERM = re.compile(f"[{_CJK}]|[^\\W{_CJK}]+")
_SUFFIXES = ("ing", "ed", "es", "s")


@functools.cache
def stop_words() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

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
        from sklearn.feature_extraction.text import CountVectorizer

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


# --------------------------------------------------------------------------------------------------
# Retrieval and grounding


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
            raise ValueError(f"need k >= 1 and 0 < threshold <= 1, got k={k}, threshold={threshold}")
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
        raise ValueError("a grounded conversation needs a user message")
    hits = index.relevant(messages[last]["content"])
    while True:
        out = list(messages)
        if hits:
            out.insert(last, {"role": "system", "content": system_message(hits)})
        if len(hits) <= 1 or fits is None or fits(out):
            return Grounding(out, hits)
        hits = hits[:-1]


# --------------------------------------------------------------------------------------------------
# Tuning data


def _variants(question: str, rng: random.Random, n: int) -> list[str]:
    """The question as customers type it: as written, lowercased without punctuation, with a greeting..."""
    plain = " ".join(re.sub(r"[^\w\s']", " ", question).lower().split())
    greetings = ["Hi, ", "Hello! ", "Hi there. ", "Quick question: ", "Hey, "]
    pool = [question, plain, rng.choice(greetings) + question, rng.choice(greetings) + plain, plain + "?",
            question + " Thanks!", "Can you help? " + question, plain + " please"]
    return pool[:n]


def grounded_examples(entries: Sequence[FaqEntry], variants: int = 3, seed: int = 0) -> list[list[dict]]:
    """Conversations [system with retrieved entries, user question, assistant = best entry's answer].

    Retrieval runs over `entries` themselves, so the other entries in the prompt are the real near misses.
    The target is the answer of the first entry in the prompt: the model learns to copy what retrieval
    put first, the behaviour the server relies on. Variants whose retrieval fails are left out."""
    index = FaqIndex(entries)
    rng = random.Random(seed)
    out = []
    for entry in entries:
        for question in _variants(entry.question, rng, variants):
            g = ground(index, [{"role": "user", "content": question}])
            if g.grounded:
                out.append([*g.messages, {"role": "assistant", "content": g.hits[0].entry.answer}])
    return out


def pseudo_faq(root: str | os.PathLike | None = None, cache: str = "", max_chars: int = 160) -> list[FaqEntry]:
    """chatterbot-corpus English Q/A pairs (tech_support first, then the other topics) as pseudo-FAQ entries:
    the first exchange of each conversation, one entry per distinct question, answers of FAQ length only."""
    from palmkit.tasks import CHATTERBOT, package_dir, read_chatterbot

    folder = package_dir(CHATTERBOT, root, cache) / "chatterbot_corpus" / "data" / "english"
    files = sorted(folder.glob("*.yml"), key=lambda p: (p.stem != "tech_support", p.name))
    seen, out = set(), []
    for path in files:
        for question, answer in (c[:2] for c in read_chatterbot([path])):
            key = question["content"].lower()
            if key not in seen and len(answer["content"]) <= max_chars:
                seen.add(key)
                out.append(FaqEntry(" ".join(question["content"].split()), " ".join(answer["content"].split()),
                                    path.name))
    return out


def _take(examples: list, n: int, seed: int) -> list:
    from palmkit.tasks import subsample

    return subsample(examples, n, seed) if n > 0 else []  # subsample's n = 0 means all of them


def build_sft_data(faq: Sequence[FaqEntry], out: str | os.PathLike, dialogue: int = 200, pseudo: int = 300,
                   faq_variants: int = 8, seed: int = 0, root: str | os.PathLike | None = None) -> dict:
    """Write OUT/train.jsonl ({"messages": [...]} per line) for `finetune_chat`: grounded examples from the
    FAQ (every entry, `faq_variants` phrasings), up to `pseudo` grounded chatterbot pseudo-FAQ examples and
    up to `dialogue` plain conversations of task dialogue-en (first exchange only: the prompt length of one
    question). Returns the counts. root: task package files (tests: the fixtures)."""
    from palmkit.checkpoint import atomic_write_bytes
    from palmkit.tasks import load_task

    rng = random.Random(seed)
    own = grounded_examples(faq, faq_variants, seed)
    entries = pseudo_faq(root)
    tech = {e.answer for e in entries if e.where == "tech_support.yml"}
    chatter = grounded_examples(entries, 2, seed)
    # all of tech_support (the support-style topic), then a sample of the other topics
    first = [c for c in chatter if c[-1]["content"] in tech][:pseudo]
    chatter = first + _take([c for c in chatter if c[-1]["content"] not in tech], pseudo - len(first), seed)
    # the first exchange, when short: a long one would set the padded length of its whole batch
    short = [c[:2] for c in load_task("dialogue-en", root=root, seed=seed).train
             if len(c[0]["content"]) + len(c[1]["content"]) <= 240]
    chats = _take(short, dialogue, seed)
    rows = own + chatter + chats
    rng.shuffle(rows)
    path = Path(out) / "train.jsonl"
    atomic_write_bytes(path, "".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in rows).encode())
    return {"path": str(path), "faq": len(own), "pseudo_faq": len(chatter), "dialogue": len(chats),
            "total": len(rows)}


# --------------------------------------------------------------------------------------------------
# Answering without a server, and the recipe


def answer(model, tokenizer, index: FaqIndex, question: str, max_new_tokens: int = 96) -> tuple[str, Grounding]:
    """The assistant's greedy answer to one question (the server's answer at temperature 0)."""
    from palmkit.chat import END, format_chat
    from palmkit.generate import SamplingParams, generate

    context = model.config.max_seq_len
    g = ground(index, [{"role": "user", "content": question}],
               fits=lambda m: len(tokenizer.encode(format_chat(m), bos=True)) < context)
    if not g.grounded:
        return NO_ANSWER, g
    prompt = format_chat(g.messages)
    room = context - len(tokenizer.encode(prompt, bos=True))
    if room < 1:
        raise ValueError(f"the grounded prompt does not fit the model's {model.config.max_seq_len} tokens")
    params = SamplingParams(max_new_tokens=min(max_new_tokens, room), temperature=0, stop=(END,))
    return generate(model, tokenizer, prompt, params)[0].text.strip(), g


EXAMPLE_QUESTIONS = ["I forgot my password, how can I reset it?", "how do i cancel my subscription",
                     "What is the capital of France?"]


def recipe(checkpoint: str = "", faq: str = "", out: str = "runs/support", serve: bool = False,
           host: str = "127.0.0.1", port: int = 8000, max_train: int = 1000, epochs: int = 4, lr: float = 1e-3,
           max_len: int = 160, dialogue: int = 100, pseudo: int = 150, seed: int = 0,
           base_minutes: float = 3.0) -> str | None:
    """Customer-service assistant: tune a base model on chat data and FAQ-grounded examples, show answers,
    then (--serve) serve it with the FAQ and a web chat page at http://HOST:PORT/.

    --checkpoint: the base model (default: the quickstart's, else a short English pretraining now).
    --faq: question/answer pairs, CSV (header question,answer) or JSONL (default: the demo FAQ shipped with
    palmkit). --max-train / --epochs bound the tuning time (3-4 minutes on 2 CPU cores by default);
    --dialogue / --pseudo: how many plain chats and chatterbot pseudo-FAQ examples join the FAQ's own
    (8 phrasings of each entry). The FAQ dominates the mix: a base model trained for minutes learns its answers
    rather than a general skill of copying from the prompt, so tune again when the FAQ changes.
    The tuned model lands in OUT/model; OUT/data/train.jsonl is what it was tuned on.
    """
    import torch

    from palmkit.checkpoint import load_checkpoint
    from palmkit.finetune import finetune_chat
    from palmkit.recipes import base_checkpoint

    started = time.perf_counter()
    faq_path = Path(faq) if faq else default_faq()
    index = FaqIndex.from_file(faq_path)  # a bad FAQ file fails before minutes of training
    base = base_checkpoint(checkpoint, minutes=base_minutes)
    out_dir = Path(out)
    counts = build_sft_data(index.entries, out_dir / "data", dialogue=dialogue, pseudo=pseudo, seed=seed)
    print(f"tuning data: {counts['total']} conversations ({counts['faq']} grounded on {faq_path.name}, "
          f"{counts['pseudo_faq']} on chatterbot pseudo-FAQ, {counts['dialogue']} plain dialogue) "
          f"in {counts['path']}")
    context = json.loads((base / "config.json").read_text(encoding="utf-8"))["model"]["max_seq_len"]
    t0 = time.perf_counter()
    # batches of 8: examples run from 30 to 190 tokens and a batch is padded to its longest
    best = finetune_chat(str(base), str(out_dir / "model"), train_file=counts["path"], max_train=max_train,
                         epochs=epochs, lr=lr, batch_size=8, max_len=min(max_len, context), max_valid=100, seed=seed)
    tune_s = time.perf_counter() - t0
    model_dir = out_dir / "model"
    torch.manual_seed(seed)
    model, tokenizer, _ = load_checkpoint(model_dir)
    questions = EXAMPLE_QUESTIONS if faq_path.resolve() == default_faq().resolve() else [
        f"hi, {index.entries[0].question.lower()}", index.entries[len(index.entries) // 2].question,
        EXAMPLE_QUESTIONS[-1]]
    lines = [f"tuned in {tune_s / 60:.1f} min (validation loss {best.get('valid/loss', float('nan')):.3f}); "
             f"total {(time.perf_counter() - started) / 60:.1f} min", ""]
    for question in questions:
        text, g = answer(model, tokenizer, index, question)
        lines += [f"You: {question}", f"Assistant: {text}"]
        lines.append(f"  Source: {g.hits[0].entry.question} ({g.hits[0].entry.where})" if g.grounded
                     else "  (no FAQ entry matches: fixed answer, the model was not asked)")
        lines.append("")
    command = f"palmkit serve --checkpoint {model_dir} --faq {faq_path} --port {port}"
    lines += [f"Serve it:  {command}", f"then open http://{host}:{port}/ (chat page) or use the OpenAI API at "
              f"http://{host}:{port}/v1"]
    summary = "\n".join(lines)
    if not serve:
        return summary
    print(summary, flush=True)
    del model
    from palmkit.serve import serve as serve_model

    print(f"serving on http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    serve_model(str(model_dir), host=host, port=port, faq=str(faq_path))
    return None
