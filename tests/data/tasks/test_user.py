"""Tasks from the user's own files: CSV, JSONL, CoNLL and conversations."""

import json

import pytest

from palmkit.data.tasks import LabelledText, TaggedSentence, load_user_task, user_examples
from palmkit.errors import PalmkitError


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
