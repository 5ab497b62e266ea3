"""`POST /v1/classify` for a fine-tuned classifier, matching the Python API; the key and the size checked before its
body is read, only what the classifier reads tokenized, and a dead engine answered with 503."""

import time

import httpx
import pytest

from palmkit.data.tasks import TaskFiles
from palmkit.finetune.classify import finetune_classify
from palmkit.finetune.fit import FinetuneConfig
from palmkit.finetune.predict import load_classifier
from palmkit.serve.app import create_app
from palmkit.serve.limits import Limits, cut_text
from tests.conftest import easy_task
from tests.serve.conftest import running
from tests.serve.test_guard import raw_request

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(300)]  # tiny models: one thread


@pytest.fixture(scope="module")
def served(checkpoint, tmp_path_factory):
    """A `finetune classify` folder (one quick epoch on an easy task)."""
    tmp = tmp_path_factory.mktemp("classify")
    out = tmp / "served"
    finetune_classify(str(checkpoint), str(out),
                      data=TaskFiles(train_file=str(easy_task(tmp, n=40)), text_field="sentence", label_field="animal"),
                      train=FinetuneConfig(epochs=1, batch_size=16, lr=2e-3, max_len=32))
    return out


def test_served_classifier_answers_v1_classify(served):
    """A `finetune classify` folder served by `palmkit serve` gets POST /v1/classify, matching the Python API."""
    texts = ["a quick fox", "a lazy dog"]
    expected = load_classifier(served).predict(texts)
    with running(create_app(served)) as base:
        r = httpx.post(f"{base}/v1/classify", json={"model": "served", "input": texts}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert [d["label"] for d in body["data"]] == [label for label, _ in expected]
        for d, (_, probs) in zip(body["data"], expected, strict=True):
            assert d["probabilities"] == pytest.approx(probs, abs=1e-5)
        assert httpx.post(f"{base}/v1/classify", json={"model": "served", "input": []}).status_code == 400
        assert httpx.post(f"{base}/v1/classify", json={"model": "nope", "input": "x"}).status_code == 404
        assert httpx.post(f"{base}/v1/classify", json={"model": "served", "input": 3}).status_code == 400


def test_classify_checks_the_key_and_the_size_before_reading_the_body(served):
    head = ("POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Content-Length: 60000000\r\n{}\r\n\r\n")  # 60 MB announced, none sent: answered without waiting
    with running(create_app(served, api_key="sekret")) as base:
        assert raw_request(base, head.format("X-Nothing: 1")).startswith(b"HTTP/1.1 401")
        assert raw_request(base, head.format("Authorization: Bearer sekret")).startswith(b"HTTP/1.1 413")


def test_classify_tokenizes_only_the_part_of_a_long_text_it_reads(served, monkeypatch):
    app = create_app(served, limits=Limits(max_body_bytes=4 << 20))
    state = app.state.palmkit
    classifier = load_classifier(served)
    long = "a quick fox jumps " * 150_000  # 2.7 M characters
    lengths = []
    encode = state.tokenizer.encode
    monkeypatch.setattr(state.tokenizer, "encode", lambda text, *a, **k: lengths.append(len(text)) or encode(text))
    with running(app) as base:
        r = httpx.post(f"{base}/v1/classify", json={"model": "served", "input": long}, timeout=60)
    assert r.status_code == 200
    assert lengths == [len(cut_text(long, classifier.max_len, state.piece_chars))] and lengths[0] < 10_000
    # the cut changes nothing the classifier reads
    assert r.json()["data"][0]["probabilities"] == pytest.approx(classifier.predict([long])[0][1], abs=1e-5)


def test_classify_answers_503_when_the_engine_has_died(served):
    app = create_app(served)
    with running(app) as base:
        app.state.palmkit.engine.stop()  # as if its thread had died
        r = httpx.post(f"{base}/v1/classify", json={"model": "served", "input": "x"}, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_stopped"


def test_a_classify_burst_is_admitted_up_to_the_limit_and_hands_the_engine_one_slice_at_a_time(served, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from palmkit.serve.classify import SLICE

    app = create_app(served, limits=Limits(max_side_requests=2))
    engine = app.state.palmkit.engine
    waiting, most, slices = [0], [0], [0]
    call = engine.call

    def counted(fn):  # how many engine calls wait at once; each slice made slow enough for requests to overlap
        waiting[0] += 1
        most[0] = max(most[0], waiting[0])

        def run():
            waiting[0] -= 1
            slices[0] += 1
            time.sleep(0.05)
            return fn()

        return call(run)

    monkeypatch.setattr(engine, "call", counted)
    texts = [f"a quick fox number {i}" for i in range(3 * SLICE)]
    with running(app) as base:
        def post(_):
            return httpx.post(f"{base}/v1/classify", json={"model": "served", "input": texts}, timeout=60)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, range(8)))
            health = [httpx.get(f"{base}/health", timeout=10).json()["status"] for _ in range(5)]
        statuses = [r.status_code for r in answers]
        assert set(statuses) == {200, 429} and statuses.count(200) >= 2, statuses
        assert all(r.headers["retry-after"] == "1" for r in answers if r.status_code == 429)
        assert all(len(r.json()["data"]) == len(texts) for r in answers if r.status_code == 200)
        assert most[0] == 1  # never a second call waiting: a decode step runs between any two
        assert slices[0] == 3 * statuses.count(200)
        assert set(health) <= {"ok", "busy"}
        assert httpx.get(f"{base}/health", timeout=10).json() == {"status": "ok"}
