"""The fine-tuning loop: early stopping stops and keeps the best checkpoint."""

import pytest
import torch

from palmkit.errors import PalmkitError
from palmkit.finetune.encode import Item
from palmkit.finetune.fit import FinetuneConfig, fit
from palmkit.finetune.heads import HEAD_FILE, SequenceClassifier
from palmkit.io import load_tensors
from palmkit.model.checkpoint import load_config
from palmkit.train.metrics import read_metrics
from tests.conftest import random_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models train fastest on one thread


def test_early_stopping_stops_and_keeps_the_best(tokenizer, tmp_path):
    model = random_model(tokenizer.vocab_size)
    module = SequenceClassifier(model, 2)
    items = [Item([5, 6, 7, tokenizer.eos_id], i % 2) for i in range(8)]
    scores = iter([0.5, 0.8, 0.7, 0.6, 0.95, 0.99])
    heads = []

    def validate():
        heads.append(module.head.weight.detach().clone())
        return {"loss": 1.0, "accuracy": next(scores)}

    cfg = FinetuneConfig(epochs=10, batch_size=4, eval_every=1, patience=2, lr=1e-2)
    best = fit(module, model, tokenizer, items, validate,
               lambda m, ids, n, y: torch.nn.functional.cross_entropy(m(ids, n), y), cfg, tmp_path / "run",
               "accuracy", {"task": "classify", "labels": ["a", "b"], "pooling": "last"})
    assert best["step"] == 2 and best["valid/accuracy"] == 0.8 and best["steps"] == 4  # 0.7, 0.6: stop
    saved = load_tensors(tmp_path / "run" / HEAD_FILE)
    torch.testing.assert_close(saved["weight"], heads[1], rtol=0, atol=0)
    assert not torch.equal(saved["weight"], heads[3])
    assert load_config(tmp_path / "run")["best"]["step"] == 2
    assert any("early stop" in r.get("event", "") for r in read_metrics(tmp_path / "run" / "metrics.jsonl"))


def test_finetune_never_replaces_a_folder_with_the_users_files(tokenizer, tmp_path):
    model = random_model(tokenizer.vocab_size)
    module = SequenceClassifier(model, 2)
    items = [Item([5, 6, 7, tokenizer.eos_id], i % 2) for i in range(4)]
    out = tmp_path / "mine"
    out.mkdir()
    (out / "data.csv").write_text("text,label\n")
    validated = []

    def run(**kw):
        return fit(module, model, tokenizer, items, lambda: validated.append(1) or {"loss": 1.0, "accuracy": 0.5},
                   lambda m, ids, n, y: torch.nn.functional.cross_entropy(m(ids, n), y),
                   FinetuneConfig(epochs=1, batch_size=4), out, "accuracy",
                   {"task": "classify", "labels": ["a", "b"], "pooling": "last"}, **kw)

    with pytest.raises(PalmkitError, match=r"not a palmkit folder .*data\.csv.*--force"):
        run()
    assert not validated and [p.name for p in out.iterdir()] == ["data.csv"]  # refused before training
    run(force=True)
    assert (out / "data.csv").read_text() == "text,label\n" and (out / HEAD_FILE).is_file()
    run(force=True)  # again: palmkit's files (its manifest) replaced, the user's kept
    assert (out / "data.csv").read_text() == "text,label\n" and (out / "learning_curve.png").is_file()


def test_force_never_deletes_user_files_that_carry_palmkits_names(tokenizer, tmp_path):
    """eval/ and tensorboard/ made by the user are not palmkit's: refused with or without --force, untouched."""
    model = random_model(tokenizer.vocab_size)
    module = SequenceClassifier(model, 2)
    items = [Item([5, 6, 7, tokenizer.eos_id], i % 2) for i in range(4)]
    out = tmp_path / "mine"
    (out / "eval").mkdir(parents=True)
    (out / "eval" / "gold.jsonl").write_text('{"label": "a"}\n')
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events.mine").write_text("my runs")
    for force in (False, True):
        with pytest.raises(PalmkitError, match="eval, tensorboard"):
            fit(module, model, tokenizer, items, lambda: {"loss": 1.0, "accuracy": 0.5},
                lambda m, ids, n, y: torch.nn.functional.cross_entropy(m(ids, n), y),
                FinetuneConfig(epochs=1, batch_size=4), out, "accuracy",
                {"task": "classify", "labels": ["a", "b"], "pooling": "last"}, force=force)
    assert (out / "eval" / "gold.jsonl").read_text() == '{"label": "a"}\n'
    assert (out / "tensorboard" / "events.mine").read_text() == "my runs"
    assert sorted(p.name for p in out.iterdir()) == ["eval", "tensorboard"]
