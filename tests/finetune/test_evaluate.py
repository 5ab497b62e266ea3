"""`palmkit evaluate`: reports equal scikit-learn's, zero-shot tasks, taggers and chat models, refused inputs."""

import json
import math

import pytest
from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support

from palmkit.cli import main
from palmkit.data.tasks import TaskFiles, load_task, subsample
from palmkit.errors import PalmkitError
from palmkit.finetune.baselines import most_frequent_tag_baseline, needs_char_ngrams, tfidf_baseline
from palmkit.finetune.chat import finetune_chat
from palmkit.finetune.evaluate import evaluate
from palmkit.finetune.fit import FinetuneConfig
from palmkit.finetune.ner import finetune_ner
from palmkit.finetune.predict import load_classifier, load_tagger
from palmkit.finetune.scores import entity_scores
from tests.conftest import TASK_ROOT, finetuned_classifier

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models train fastest on one thread


@pytest.fixture(autouse=True)
def fixture_data(monkeypatch):
    monkeypatch.setenv("PALMKIT_TASK_DATA", str(TASK_ROOT))


@pytest.fixture(scope="module")
def classifier(checkpoint, tmp_path_factory):
    return finetuned_classifier(checkpoint, tmp_path_factory.mktemp("eval") / "sst", "sentiment-en", batch_size=8,
                                max_len=48)


def _check_report(entry: dict, gold: list[str], pred: list[str], labels: list[str]):
    sk = classification_report(gold, pred, labels=labels, output_dict=True, zero_division=0)
    for label in labels:
        for key in ("precision", "recall", "f1-score", "support"):
            assert entry["per_class"][label][key] == pytest.approx(sk[label][key])
    for avg in ("macro avg", "weighted avg"):
        for key in ("precision", "recall", "f1-score"):
            assert entry["averages"][avg][key] == pytest.approx(sk[avg][key])
    micro = precision_recall_fscore_support(gold, pred, labels=labels, average="micro", zero_division=0)
    assert [entry["averages"]["micro avg"][k] for k in ("precision", "recall", "f1-score")] == pytest.approx(micro[:3])
    assert entry["accuracy"] == pytest.approx(sum(g == p for g, p in zip(gold, pred, strict=True)) / len(gold))
    assert entry["macro_f1"] == pytest.approx(sk["macro avg"]["f1-score"])
    assert entry["confusion"] == confusion_matrix(gold, pred, labels=labels).tolist()


def test_classifier_report_equals_scikit_learn(classifier, tmp_path):
    out = tmp_path / "report"
    result = evaluate(str(classifier), eval_tasks=["sentiment-fr,sentiment-de", "sentiment-zh"], out=str(out))
    assert list(result["tasks"]) == ["sentiment-en", "sentiment-fr", "sentiment-de", "sentiment-zh"]
    clf = load_classifier(classifier)
    en = load_task("sentiment-en")
    baseline = tfidf_baseline(en.train, char_ngrams=False)  # trained on English, also for the zero-shot rows
    for name, entry in result["tasks"].items():
        test = load_task(name).test
        gold = [ex.label for ex in test]
        assert entry["examples"] == len(test) and entry["zero_shot"] == (name != "sentiment-en")
        _check_report(entry["model"], gold, [p for p, _ in clf.predict([ex.text for ex in test])], clf.labels)
        _check_report(entry["baseline"], gold, list(baseline.predict([ex.text for ex in test])), clf.labels)
        assert (out / f"confusion_{name}.png").stat().st_size > 1000
    saved = json.loads((out / "report.json").read_text())
    assert saved["tasks"]["sentiment-zh"]["model"]["accuracy"] == result["tasks"]["sentiment-zh"]["model"]["accuracy"]
    md = (out / "report.md").read_text()
    assert "| sentiment-fr |" in md and "weighted avg" in md and "micro avg" in md and "TF-IDF" in md


def test_evaluate_cli_writes_into_the_checkpoint(classifier, capsys):
    assert main(["evaluate", "--checkpoint", str(classifier), "--baseline", "false", "--max_examples", "2"]) == 0
    assert "| sentiment-en | 2 | no |" in capsys.readouterr().out
    entry = json.loads((classifier / "eval" / "report.json").read_text())["tasks"]["sentiment-en"]
    assert "baseline" not in entry and entry["examples"] == 2


def test_another_task_is_zero_shot_with_the_english_baseline(classifier, tmp_path):
    result = evaluate(str(classifier), task="sentiment-de", out=str(tmp_path))
    assert list(result["tasks"]) == ["sentiment-de"] and result["tasks"]["sentiment-de"]["zero_shot"]
    assert result["trained_on"] == "sentiment-en" and result["train_examples"] == len(load_task("sentiment-en").train)
    assert needs_char_ngrams(["这本书很好看", "質の良い本"]) and not needs_char_ngrams(["ein gutes Buch", "très bien"])


def test_labels_the_classifier_lacks_are_refused(classifier):
    with pytest.raises(PalmkitError, match="neutral"):
        evaluate(str(classifier), eval_tasks=["tweets-en"], split="train")


def test_tagger_report_and_baseline(checkpoint, tmp_path):
    out = tmp_path / "ner"
    finetune_ner(str(checkpoint), str(out), data=TaskFiles(task="ner-zh"),
                 train=FinetuneConfig(epochs=1, batch_size=8, max_len=48, max_train=20))
    result = evaluate(str(out), out=str(tmp_path / "r"))
    entry = result["tasks"]["ner-zh"]
    data = load_task("ner-zh")
    gold = [s.tags for s in data.test]
    pred = load_tagger(out).tag_words([s.tokens for s in data.test])
    assert entry["model"] == entity_scores(gold, pred)
    seen = subsample(data.train, 20, seed=0)  # the baseline learns from the very sentences the model saw
    assert result["train_examples"] == 20 < len(data.train)
    assert entry["baseline"] == entity_scores(gold, most_frequent_tag_baseline(seen)([s.tokens for s in data.test]))
    assert "| ner-zh |" in (tmp_path / "r" / "report.md").read_text()


def test_chat_evaluation_scores_assistant_tokens(checkpoint, tmp_path, capsys):
    out = tmp_path / "chat"
    finetune_chat(str(checkpoint), str(out), data=TaskFiles(task="dialogue-en"),
                  train=FinetuneConfig(epochs=1, batch_size=4, max_len=64))
    capsys.readouterr()
    entry = evaluate(str(out), out=str(tmp_path / "r"))["tasks"]["dialogue-en"]
    assert "evaluate dialogue-en" in capsys.readouterr().err  # a progress bar while it scores
    assert entry["examples"] == 3 and entry["model"]["assistant_tokens"] > 0
    assert math.isfinite(entry["model"]["assistant_loss"]) and entry["model"]["assistant_ppl"] > 1


def test_plain_checkpoints_are_refused(checkpoint):
    with pytest.raises(PalmkitError, match="not a fine-tuned checkpoint"):
        evaluate(str(checkpoint))
