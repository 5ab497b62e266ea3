"""`palmkit finetune classify`: an easy task is learned, the CLI takes texts and comma lists, bad inputs."""

import json

import pytest

from palmkit.cli import main
from palmkit.data.tasks import TaskFiles
from palmkit.finetune.classify import finetune_classify
from palmkit.finetune.fit import FinetuneConfig
from palmkit.finetune.heads import HEAD_FILE
from palmkit.finetune.predict import load_classifier
from palmkit.model.checkpoint import load_checkpoint, load_config
from palmkit.model.lora import add_lora
from palmkit.model.palm import PaLM
from palmkit.train.metrics import read_metrics
from tests.conftest import easy_task, random_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models train fastest on one thread


def test_classifier_learns_an_easy_task(checkpoint, tmp_path):
    data = easy_task(tmp_path, n=160)
    out = tmp_path / "clf"
    best = finetune_classify(str(checkpoint), str(out),
                             data=TaskFiles(train_file=str(data), text_field="sentence", label_field="animal"),
                             train=FinetuneConfig(epochs=2, batch_size=16, lr=2e-3, max_len=32))
    assert best["valid/accuracy"] >= 0.9, best  # chance is 0.5
    clf = load_classifier(out)
    rows = clf.predict(["the quick fox over lazy model", "many token dog from before", "model fox"])
    assert [label for label, _ in rows][:2] == ["fox", "dog"]
    assert all(abs(sum(p.values()) - 1) < 1e-5 for _, p in rows)
    config = load_config(out)
    assert config["task"] == "classify" and config["labels"] == ["dog", "fox"] and config["pooling"] == "last"
    records = read_metrics(out / "metrics.jsonl")
    assert any("loss" in r and "examples_per_s" in r for r in records)
    assert (out / "learning_curve.png").stat().st_size > 0 and (out / HEAD_FILE).is_file()
    model, _, _ = load_checkpoint(out)  # model-only tools read the folder as a plain checkpoint
    assert isinstance(model, PaLM)


def test_classify_cli_takes_texts_and_comma_lists(checkpoint, tmp_path, capsys):
    data = easy_task(tmp_path, n=40)
    out = tmp_path / "c"
    assert main(["finetune", "classify", "--checkpoint", str(checkpoint), "--out", str(out), "--data.train_file",
                 str(data), "--data.text_field", "sentence", "--data.label_field", "animal", "--train.epochs", "1",
                 "--train.max_len", "24", "--train.lora_rank", "2",
                 "--train.lora_targets", "q_proj,k_proj,v_proj"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["trainable_params"] < 5000  # adapters on 3 projections and the head only
    assert load_config(out)["finetune"]["lora_targets"] == ["q_proj", "k_proj", "v_proj"]
    # lr 0, the default, stands for the rate that suits the method, resolved when training starts
    assert load_config(out)["finetune"]["lr"] == 0.0
    assert FinetuneConfig(lora_rank=2).peak_lr == 2e-3 and FinetuneConfig().peak_lr == 3e-4
    assert FinetuneConfig(lr=1e-3, lora_rank=2).peak_lr == 1e-3
    assert main(["classify", "--checkpoint", str(out), "a fox", "a dog", "nothing"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[2] for line in lines] == ["a fox", "a dog", "nothing"]
    assert all(line.split("\t")[0] in ("fox", "dog") for line in lines)


def test_bad_inputs_are_user_errors(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="unknown LoRA target"):
        add_lora(random_model(64), 2, 4, ["qq_proj"])
    with pytest.raises(Exception, match=r"either --data\.task"):
        finetune_classify(str(checkpoint), str(tmp_path / "x"))
    with pytest.raises(Exception, match="not a classify checkpoint"):
        load_classifier(checkpoint)


def test_left_out_records_are_written_and_counted(checkpoint, tmp_path, capsys):
    data = easy_task(tmp_path, n=40)
    lines = data.read_text().splitlines()
    text, label = lines[2].rsplit(",", 1)  # line 3 of the file: line 1 is the header
    other = "dog" if label == "fox" else "fox"
    data.write_text("\n".join([*lines, lines[1], lines[2], f"{text},{other}"]) + "\n")
    out = tmp_path / "clf"
    finetune_classify(str(checkpoint), str(out),
                      data=TaskFiles(train_file=str(data), text_field="sentence", label_field="animal"),
                      train=FinetuneConfig(epochs=1, batch_size=16, max_len=24))
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert sorted((r["where"].rsplit(":", 1)[1], r["reason"]) for r in rejected) == [
        ("3", "conflict"), ("42", "duplicate"), ("43", "conflict"), ("44", "conflict")]
    record = next(r for r in read_metrics(out / "metrics.jsonl") if r.get("event") == "data rejected")
    assert record["rejected_duplicate"] == 1 and record["rejected_conflict"] == 3
    assert "left out of the data: 3 conflicts, 1 duplicate" in capsys.readouterr().err
