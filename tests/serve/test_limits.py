"""Bounds checked before any work (body size, choices, messages, characters, stop strings), and the work that remains
(parsing, tokenizing, FAQ retrieval) done off the event loop, so that /health answers meanwhile."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from palmkit.infer.engine import Engine
from palmkit.serve.app import create_app
from palmkit.serve.grounding import FaqIndex
from palmkit.serve.limits import Limits, cut_text, max_piece_chars
from tests.serve.conftest import running
from tests.serve.test_guard import raw_request

pytestmark = pytest.mark.timeout(120)

JSON = {"Content-Type": "application/json"}


class Spy:
    """Stands in for a tokenizer's SentencePiece processor: records what it is asked to encode, and holds an
    encode of a text containing BLOCK until `release` is set."""

    def __init__(self, sp):
        self.sp, self.encoded, self.release, self.blocked = sp, [], threading.Event(), threading.Event()

    def encode(self, text, *args, **kwargs):
        self.encoded.append(len(text) if isinstance(text, str) else sum(map(len, text)))
        if isinstance(text, str) and "BLOCK" in text:
            self.blocked.set()
            assert self.release.wait(30)
        return self.sp.encode(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.sp, name)


@pytest.fixture
def spied(loaded, monkeypatch):
    model, tok = loaded
    spy = Spy(tok.sp)
    monkeypatch.setattr(tok, "sp", spy)
    yield model, tok, spy
    spy.release.set()


def test_max_piece_chars_bounds_the_characters_of_every_token(loaded):
    _, tok = loaded
    bound = max_piece_chars(tok)
    text = open(__file__, encoding="utf-8").read()
    assert all(len(tok.sp.id_to_piece(i)) <= bound for i in tok.encode(text) if not tok.sp.is_byte(i))
    assert len(tok.encode(text)) >= len(text) / bound
    assert tok.encode(cut_text(text, 50, bound))[:50] == tok.encode(text)[:50]


def test_a_body_past_the_limit_is_refused_unread(server):
    answer = raw_request(server, "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                                 f"\r\nContent-Length: {(1 << 20) + 1}\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413") and b"body_too_large" in answer and b"connection: close" in answer


def test_a_streamed_body_past_the_limit_gets_413_and_a_raised_limit_takes_it(loaded):
    model, tok = loaded
    body = json.dumps({"model": "tiny", "prompt": "a" * (3 << 19)}).encode()  # 1.5 MiB, sent without a length

    def chunks():
        for i in range(0, len(body), 1 << 16):
            yield body[i:i + (1 << 16)]

    with running(create_app(Engine(model, tok), model_name="tiny")) as base:
        r = httpx.post(f"{base}/v1/completions", content=chunks(), headers=JSON)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    with running(create_app(Engine(model, tok), model_name="tiny", limits=Limits(max_body_bytes=2 << 20))) as base:
        r = httpx.post(f"{base}/v1/completions", content=chunks(), headers=JSON)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def bounds_cases(context: int, piece_chars: int, max_batch: int) -> list:
    long_text = "ab" * (context * piece_chars // 2 + 1)
    user = {"role": "user", "content": "hi"}
    return [
        ("/v1/completions", {"prompt": ["x"] * (max_batch + 1)}, "n", "invalid_value"),
        ("/v1/completions", {"prompt": ["x", "y"], "n": max_batch // 2 + 1}, "n", "invalid_value"),
        ("/v1/completions", {"prompt": long_text}, "prompt", "context_length_exceeded"),
        ("/v1/completions", {"prompt": ["x", long_text]}, "prompt", "context_length_exceeded"),
        ("/v1/completions", {"prompt": [1] * (context + 1)}, "prompt", "context_length_exceeded"),
        ("/v1/completions", {"prompt": "x", "stop": ["s"] * 17}, "stop", "invalid_value"),
        ("/v1/completions", {"prompt": "x", "stop": "s" * 257}, "stop", "invalid_value"),
        ("/v1/chat/completions", {"messages": [user] * 257}, "messages", "invalid_value"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": long_text}]}, "messages",
         "context_length_exceeded"),
        ("/v1/chat/completions", {"messages": [user], "n": max_batch + 1}, "n", "invalid_value"),
    ]


def test_requests_too_large_by_their_counts_are_refused_before_anything_is_tokenized(spied, faq_file):
    model, tok, spy = spied
    engine = Engine(model, tok, max_batch=4)
    with running(create_app(engine, model_name="tiny", faq=faq_file)) as base:
        for path, body, param, code in bounds_cases(model.config.max_seq_len, max_piece_chars(tok), 4):
            r = httpx.post(base + path, json={"model": "tiny", **body})
            assert r.status_code == 400 and (r.json()["error"]["param"], r.json()["error"]["code"]) == (param, code)
        assert spy.encoded == []
        ok = httpx.post(f"{base}/v1/chat/completions", timeout=30,
                        json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 4, "max_tokens": 1})
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 4
    with running(create_app(engine, model_name="tiny")) as base:  # no FAQ: raw completions are served
        ok = httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": ["x"] * 4, "max_tokens": 1})
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 4


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "BLOCK the loop?", "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "BLOCK the loop?"}], "max_tokens": 1}),
])
def test_tokenizing_runs_off_the_event_loop(spied, path, body):
    model, tok, spy = spied
    with running(create_app(Engine(model, tok), model_name="tiny")) as base, ThreadPoolExecutor(1) as pool:
        slow = pool.submit(httpx.post, base + path, json={"model": "tiny", **body}, timeout=60)
        assert spy.blocked.wait(30)
        try:  # the request's tokenizing is held: the server still answers
            assert httpx.get(f"{base}/health", timeout=10).status_code == 200
        finally:
            spy.release.set()
        assert slow.result(timeout=60).status_code == 200


def test_faq_retrieval_runs_off_the_event_loop(loaded, faq_file, monkeypatch):
    model, tok = loaded
    blocked, release = threading.Event(), threading.Event()
    relevant = FaqIndex.relevant

    def held(self, question):
        blocked.set()
        assert release.wait(30)
        return relevant(self, question)

    monkeypatch.setattr(FaqIndex, "relevant", held)
    body = {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "I forgot my password"}]}
    with running(create_app(Engine(model, tok), model_name="tiny", faq=faq_file)) as base, \
            ThreadPoolExecutor(1) as pool:
        slow = pool.submit(httpx.post, f"{base}/v1/chat/completions", json=body, timeout=60)
        assert blocked.wait(30)
        try:
            assert httpx.get(f"{base}/health", timeout=10).status_code == 200
        finally:
            release.set()
        assert slow.result(timeout=60).json()["faq"]["grounded"]


def test_a_body_that_does_not_arrive_in_time_gets_408(loaded):
    model, tok = loaded
    with running(create_app(Engine(model, tok), model_name="tiny", limits=Limits(body_seconds=0.5))) as base:
        # 100 bytes announced, 10 sent: the route stops waiting for the rest
        answer = raw_request(base, "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                                   '\r\nContent-Length: 100\r\n\r\n{"model": ')
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
