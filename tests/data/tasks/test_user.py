"""Tasks from the user's own files: CSV, JSONL, JSON arrays, CoNLL, conversations (TRL's shapes too), numbered
labels and tags with their names, errors that say where and what the record holds."""

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
    with pytest.raises(PalmkitError, match=r"train.jsonl:1: no field 'text' \(set by --text_field\); the record "
                                           r"has fields 't', 'y'"):
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


def _write(path, records, array=False):
    if array:
        path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_json_arrays_read_as_jsonl(tmp_path):
    records = [{"text": f"text {i}", "label": "ab"[i % 2]} for i in range(5)]
    lines = user_examples(_write(tmp_path / "a.jsonl", records), "classify")
    assert user_examples(_write(tmp_path / "a.json", records, array=True), "classify") == lines
    assert lines[1] == LabelledText("text 1", "b")
    # an error names the line the bad record starts on in the array (4 lines per record, after "[")
    _write(tmp_path / "b.json", [*records[:3], {"txt": "x", "label": "a"}], array=True)
    with pytest.raises(PalmkitError, match=r"b.json:14: no field 'text'.*fields 'txt', 'label'"):
        user_examples(tmp_path / "b.json", "classify")
    (tmp_path / "c.json").write_text('[{"text": "x", "label": "a"},\n {"text": ]', encoding="utf-8")
    with pytest.raises(PalmkitError, match=r"c.json:2: not a JSON array"):
        user_examples(tmp_path / "c.json", "classify")


def test_trl_prompt_completion_and_messages(tmp_path):
    hi = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    records = [{"prompt": "hi", "completion": "hello"},
               {"prompt": [{"role": "system", "content": "Be kind."}, hi[0]], "completion": [hi[1]]},
               {"messages": hi}]
    assert user_examples(_write(tmp_path / "trl.json", records, array=True), "chat") == [
        hi, [{"role": "system", "content": "Be kind."}, *hi], hi]
    _write(tmp_path / "bad.jsonl", [{"messages": hi}, {"prompt": "hi", "answer": "x"}])
    with pytest.raises(PalmkitError, match=r"bad.jsonl:2: a conversation needs 'messages', or 'prompt' and "
                                           r"'completion'; the record has fields 'prompt', 'answer'"):
        user_examples(tmp_path / "bad.jsonl", "chat")
    _write(tmp_path / "role.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(PalmkitError, match=r"role.jsonl:1: messages\[0\] must be"):
        user_examples(tmp_path / "role.jsonl", "chat")


def test_class_numbers_with_and_without_names(tmp_path):
    path = _write(tmp_path / "n.jsonl", [{"text": f"t {i}", "label": i % 3} for i in range(30)])
    data = load_user_task("classify", str(path), label_names="negative,neutral,positive")
    assert data.labels == ["negative", "neutral", "positive"]  # the names' order, not sorted
    assert user_examples(path, "classify", label_names=["negative", "neutral", "positive"])[4] == \
        LabelledText("t 4", "neutral")
    assert load_user_task("classify", str(path)).labels == ["0", "1", "2"]  # without names: the numbers
    with pytest.raises(PalmkitError, match=r"n.jsonl:3: label 2 is out of range for the 2 names"):
        user_examples(path, "classify", label_names="a,b")
    csv_file = tmp_path / "n.csv"
    csv_file.write_text("text,label\nfine,1\nawful,0\n", encoding="utf-8")
    assert user_examples(csv_file, "classify", label_names="neg,pos") == [LabelledText("fine", "pos"),
                                                                           LabelledText("awful", "neg")]


def test_numbered_ner_tags_need_their_names(tmp_path):
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    path = _write(tmp_path / "ner.jsonl", [{"id": "0", "tokens": ["Anna", "Lee", "in", "Rome"],
                                            "ner_tags": [1, 2, 0, 3]}])
    assert user_examples(path, "ner", label_field="ner_tags", label_names=names) == [
        TaggedSentence(["Anna", "Lee", "in", "Rome"], ["B-PER", "I-PER", "O", "B-LOC"])]
    with pytest.raises(PalmkitError, match=r"ner.jsonl:1: tag 1 is a number: give the name of each "
                                           r"\(--label_names"):
        user_examples(path, "ner", label_field="ner_tags")
    with pytest.raises(PalmkitError, match=r"ner.jsonl:1: no field 'tags' \(set by --label_field\); the record has "
                                           r"fields 'id', 'tokens', 'ner_tags'"):
        user_examples(path, "ner")


def test_duplicates_and_conflicting_labels_are_reported_by_file_and_line(tmp_path):
    train = tmp_path / "train.csv"
    rows = ["text,label", "good film,pos", "bad film,neg", "good film,pos", "so so,pos", "so so,neg", "fine,pos",
            "in the test,neg"]
    train.write_text("\n".join(rows) + "\n", encoding="utf-8")
    test = _write(tmp_path / "test.jsonl", [{"text": "in the test", "label": "neg"}])
    valid = _write(tmp_path / "valid.jsonl", [{"text": "checked", "label": "pos"}])
    data = load_user_task("classify", str(train), str(valid), str(test))
    assert [ex.text for ex in data.train] == ["good film", "bad film", "fine"]
    assert [ex.text for ex in data.test] == ["in the test"]  # kept where it is evaluated, left out of training
    got = {(r["where"], r["reason"]) for r in data.rejected}
    # csv lines count the header: "good film" is on line 2, its copy on line 4
    assert got == {(f"{train}:4", "duplicate"), (f"{train}:5", "conflict"), (f"{train}:6", "conflict"),
                   (f"{train}:8", "duplicate")}
    dup = next(r for r in data.rejected if r["where"] == f"{train}:4")
    assert dup["detail"] == f"first at {train}:2" and dup["text"] == "good film"
    conll = tmp_path / "ner.conll"
    conll.write_text("Anna\tB-PER\n\nBerlin\tB-LOC\n\nAnna\tB-PER\n")
    ner = load_user_task("ner", str(conll))
    assert [r["where"] for r in ner.rejected] == [f"{conll}:5"]


def test_parquet_records_as_corpus_build_reads_them(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    table = pa.table({"sentence": [f"text {i}" for i in range(30)] + ["text 0"], "y": [i % 2 for i in range(30)] + [1]})
    pq.write_table(table, path, row_group_size=8)  # several row groups: rows are numbered across them
    data = load_user_task("classify", str(path), text_field="sentence", label_field="y", label_names="neg,pos")
    assert data.labels == ["neg", "pos"] and len(data.train) + len(data.valid) + len(data.test) == 29
    # row 31 repeats row 1's text with the other label: both copies are left out
    assert [(r["where"], r["reason"]) for r in data.rejected] == [(f"{path}:1", "conflict"), (f"{path}:31", "conflict")]
    chat = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"prompt": ["hi"], "completion": ["hello"]}), chat)
    assert user_examples(chat, "chat") == [[{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "hello"}]]
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(PalmkitError, match="not a readable Parquet file"):
        user_examples(tmp_path / "bad.parquet", "chat")
