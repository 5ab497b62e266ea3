"""`POST /v1/classify` for a fine-tuned classifier, matching the Python API."""

import pytest

from palmkit.finetune.classify import finetune_classify
from palmkit.finetune.fit import FinetuneConfig
from palmkit.finetune.predict import load_classifier
from tests.conftest import easy_task
from tests.serve.conftest import running

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models train fastest on one thread


def test_served_classifier_answers_v1_classify(checkpoint, tmp_path):
    """A `finetune classify` folder served by `palmkit serve` gets POST /v1/classify, matching the Python API."""
    import httpx

    from palmkit.serve.app import create_app

    data = easy_task(tmp_path, n=40)
    out = tmp_path / "served"
    finetune_classify(str(checkpoint), str(out), train_file=str(data), text_field="sentence",
                      label_field="animal", train=FinetuneConfig(epochs=1, batch_size=16, lr=2e-3, max_len=32))
    texts = ["a quick fox", "a lazy dog"]
    expected = load_classifier(out).predict(texts)
    with running(create_app(out)) as base:
        r = httpx.post(f"{base}/v1/classify", json={"model": "served", "input": texts}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert [d["label"] for d in body["data"]] == [label for label, _ in expected]
        for d, (_, probs) in zip(body["data"], expected, strict=True):
            assert d["probabilities"] == pytest.approx(probs, abs=1e-5)
        assert httpx.post(f"{base}/v1/classify", json={"model": "served", "input": []}).status_code == 400
        assert httpx.post(f"{base}/v1/classify", json={"model": "nope", "input": "x"}).status_code == 404
        assert httpx.post(f"{base}/v1/classify", json={"model": "served", "input": 3}).status_code == 400
