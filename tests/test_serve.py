"""The server on loopback, driven by the official openai client and by plain HTTP."""

import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch
import uvicorn
from fastapi import APIRouter, Request

from palmkit.infer.engine import Engine
from palmkit.infer.generate import generate
from palmkit.infer.sampling import SamplingParams
from palmkit.model.chat_template import format_chat
from palmkit.model.checkpoint import load_checkpoint
from palmkit.serve.app import create_app
from tests.conftest import Scripted

pytestmark = pytest.mark.timeout(120)


@contextmanager
def running(app):
    """Serve `app` with uvicorn in a thread on a free loopback port; yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def wait_for(predicate, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


class Slow(torch.nn.Module):
    """The same model, sleeping before every forward pass so that requests overlap on a fast machine."""

    def __init__(self, inner, delay: float):
        super().__init__()
        self.inner, self.delay, self.config, self.embed_tokens = inner, delay, inner.config, inner.embed_tokens

    def hidden_states(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.inner.hidden_states(*args, **kwargs)

    def logits(self, h):
        return self.inner.logits(h)


class Flaky(Slow):
    """The same model, failing on any input that contains token 13."""

    def hidden_states(self, idx, *args, **kwargs):
        if (idx == 13).any():
            raise RuntimeError("boom")
        return super().hidden_states(idx, *args, **kwargs)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    model, tok, _ = load_checkpoint(checkpoint)
    return model, tok


@pytest.fixture(scope="module")
def server(checkpoint):
    with running(create_app(checkpoint)) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=30)


def greedy(model, tok, prompt, n, stop=()):
    return generate(model, tok, prompt, SamplingParams(max_new_tokens=n, temperature=0, stop=stop))[0]


def test_models_health_and_model_name_from_folder(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}


def test_completion_equals_generate(client, loaded):
    model, tok = loaded
    for prompt in ("The quick brown fox", "Der schnelle"):
        ref = greedy(model, tok, prompt, 12)
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        assert out.choices[0].text == ref.text
        assert out.choices[0].finish_reason == ref.finish_reason
        assert out.usage.prompt_tokens == len(tok.encode(prompt, bos=True))
        # The server counts the EOS it generated; generate() leaves it out of token_ids.
        assert out.usage.completion_tokens == len(ref.token_ids) + (ref.finish_reason == "stop")
        assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert len(ref.text) > 3  # the comparison is not vacuous


def test_default_max_tokens_is_openais_16(client):
    out = client.completions.create(model="tiny", prompt="x", temperature=0, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 16 and out.choices[0].finish_reason == "length"


def test_stream_equals_non_stream_for_a_seeded_sample(client):
    kwargs = dict(model="tiny", prompt="Hello", max_tokens=24, temperature=0.9, top_p=0.95, seed=3)
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert len(chunks) > 3
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_equals_generate_on_the_template(client, loaded):
    model, tok = loaded
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    ref = greedy(model, tok, format_chat(messages), 20, stop=["<|end|>"])
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.text
    assert out.usage.prompt_tokens == len(tok.encode(format_chat(messages), bos=True))
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_n_choices_and_seed(client):
    kwargs = dict(model="tiny", prompt="Once", max_tokens=10, temperature=1.0, n=3, seed=7)
    a, b = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # each choice draws from its own generator
    other = client.completions.create(**{**kwargs, "seed": 8})
    assert [c.text for c in other.choices] != [c.text for c in a.choices]


def test_stop_strings_cut_and_are_held_back_while_streaming(client):
    full = client.completions.create(model="tiny", prompt="x", max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[4:6]
    expected = full[: full.index(stop)]
    cut = client.completions.create(model="tiny", prompt="x", max_tokens=20, temperature=0, stop=[stop, "\x00"],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny", prompt="x", max_tokens=20, temperature=0, stop=stop,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


TOO_LONG = "a " * 400  # the tiny model's context is 256 tokens


@pytest.mark.parametrize("path,body,status,param,code", [
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model", "model_not_found"),
    ("/v1/completions", b"{not json", 400, None, None),
    ("/v1/completions", b"[1, 2]", 400, None, "invalid_body"),
    ("/v1/completions", {"model": "tiny"}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -1}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 10**30}, 400, "max_tokens",
     "context_length_exceeded"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "temperature": NaN}', 400, "temperature", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": 3}, 400, "temperature", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 1.5}, 400, "top_p", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 0}, 400, "n", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 100}, 400, "n", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": 5}, 400, "stop", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": []}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 99999]}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": TOO_LONG}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 2}, 400, "logprobs", "unsupported_parameter"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages", "invalid_value"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages.0.role", "invalid_value"),
    ("/v1/chat/completions", {"model": "tiny", "messages": "hello"}, 400, "messages", "invalid_value"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model",
     "model_not_found"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": TOO_LONG}]}, 400, "prompt",
     "context_length_exceeded"),
])
def test_bad_requests_get_openai_errors(server, path, body, status, param, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server + path, content=content, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert (error["param"], error["code"]) == (param, code)


def test_oversized_body_is_refused_with_413(server):
    r = httpx.post(f"{server}/v1/completions", content=b'{"prompt": "' + b"a" * (9 << 20) + b'"}', timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_unknown_routes_and_methods_answer_json(server):
    r = httpx.get(f"{server}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = httpx.get(f"{server}/v1/completions")
    assert r.status_code == 405 and "error" in r.json()
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0).models.retrieve("gpt-4")


def test_metrics_count_requests_tokens_and_latency(server, client):
    before = metric(server, "palmkit_completion_tokens_total")
    client.completions.create(model="tiny", prompt="x", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    httpx.post(f"{server}/v1/completions", content=b"{")
    text = httpx.get(f"{server}/metrics").text
    assert metric(server, "palmkit_completion_tokens_total") == before + 5
    assert re.search(r'^palmkit_requests_total\{endpoint="/v1/completions",status="200"\} [1-9]', text, re.M)
    assert re.search(r'^palmkit_requests_total\{endpoint="/v1/completions",status="400"\} [1-9]', text, re.M)
    assert re.search(r'^palmkit_request_duration_seconds_bucket\{endpoint="/v1/completions",le="\+Inf"\} [1-9]',
                     text, re.M)
    assert "# TYPE palmkit_request_duration_seconds histogram" in text
    assert metric(server, "palmkit_queue_depth") == 0 and metric(server, "palmkit_running_sequences") == 0


@pytest.mark.parametrize("padded", [False, True])
def test_concurrent_greedy_requests_batch_and_equal_generate(loaded, padded):
    model, tok = loaded
    prompts = ["The quick", "A language model", "Der", "Le renard brun", "In 2022", "Shares of", "Tabs", "素早い"]
    # Different lengths: sequences finish at different steps, so running ones move between cache slots.
    lengths = [6 + 3 * i for i in range(len(prompts))]
    refs = [greedy(model, tok, p, n) for p, n in zip(prompts, lengths, strict=True)]
    engine = Engine(Slow(model, 0.005), tok, max_batch=8, autotune=False)
    if padded:  # every step feeds all 8 rows, free ones included
        engine.step_rows = [0] + [8] * 8
    with running(create_app(engine, model_name="tiny")) as base:

        def ask(prompt, n):
            body = {"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0}
            return httpx.post(f"{base}/v1/completions", json=body, timeout=60).json()

        with ThreadPoolExecutor(len(prompts)) as pool:
            outs = list(pool.map(ask, prompts, lengths))
        assert [o["choices"][0]["text"] for o in outs] == [r.text for r in refs]
        tokens, steps = metric(base, "palmkit_completion_tokens_total"), metric(base, "palmkit_decode_steps_total")
        # Served one at a time this takes one step per token; batched, many sequences share each step.
        assert tokens == sum(o["usage"]["completion_tokens"] for o in outs)
        assert steps < tokens / 3, (steps, tokens)


class Bumpy(Slow):
    """A model whose steps take 4 times longer with 3 rows than with any other count."""

    def hidden_states(self, idx, *args, **kwargs):
        time.sleep(0.08 if idx.shape[0] == 3 else 0.02)
        return self.inner.hidden_states(idx, *args, **kwargs)


def test_step_rows_pad_up_to_a_faster_row_count(loaded):
    model, tok = loaded
    engine = Engine(Bumpy(model, 0), tok, max_batch=4, autotune=False)
    assert engine.step_rows == [0, 1, 2, 3, 4]
    # 3 running sequences step with 4 rows; the tolerance keeps timing noise from padding the others
    assert engine.tune_step_rows(tolerance=1.5) == [0, 1, 2, 4, 4]


LONG = {"model": "tiny", "prompt": "x", "max_tokens": 200, "stream": True, "ignore_eos": True}


@contextmanager
def streaming(base: str):
    """A long streaming completion that has produced its first event; leaving the block disconnects."""
    with httpx.stream("POST", f"{base}/v1/completions", json=LONG, timeout=30) as r:
        lines = r.iter_lines()  # held: a dropped line iterator closes the connection
        assert next(line for line in lines if line.startswith("data: "))
        yield r


def test_streaming_client_that_leaves_frees_its_slot(loaded):
    model, tok = loaded
    with running(create_app(Engine(Slow(model, 0.01), tok, max_batch=2), model_name="tiny")) as base:
        with streaming(base):
            assert metric(base, "palmkit_running_sequences") == 1
        assert wait_for(lambda: metric(base, "palmkit_running_sequences") == 0, 5)
        assert metric(base, "palmkit_completion_tokens_total") < 100  # stopped early, not run to the end
        # A non-streaming client that gives up is cancelled too.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/completions", json={**LONG, "stream": False}, timeout=0.5)
        assert wait_for(lambda: metric(base, "palmkit_running_sequences") == 0, 5)
        assert metric(base, "palmkit_completion_tokens_total") < 250
        assert re.search(r'status="499"\} 2$', httpx.get(f"{base}/metrics").text, re.M)


def test_full_queue_answers_429(loaded):
    model, tok = loaded
    with running(create_app(Engine(Slow(model, 0.01), tok, max_batch=1, max_queue=1), model_name="tiny")) as base:
        with streaming(base) as first, ThreadPoolExecutor(1) as pool:
            queued = pool.submit(httpx.post, f"{base}/v1/completions", timeout=30,
                                 json={"model": "tiny", "prompt": "y", "max_tokens": 3})
            assert wait_for(lambda: metric(base, "palmkit_queue_depth") == 1)
            r = httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "z"})
            assert r.status_code == 429 and r.headers["Retry-After"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
            first.close()  # leaving frees the slot for the queued request
            assert queued.result(timeout=30).status_code == 200


def test_api_key_and_extra_routers(loaded):
    model, tok = loaded
    router = APIRouter(prefix="/v1")

    @router.get("/vocab")
    async def vocab(request: Request) -> dict:
        state = request.app.state.palmkit
        return {"vocab": await state.engine.run(lambda: state.engine.vocab)}

    app = create_app(Engine(model, tok), model_name="tiny", api_key="sekret", routers=[router])
    with running(app) as base:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            r = httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "x"}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{base}/v1/vocab").status_code == 401
        assert httpx.get(f"{base}/health").status_code == 200
        good = {"Authorization": "Bearer sekret"}
        assert httpx.get(f"{base}/v1/vocab", headers=good).json() == {"vocab": tok.vocab_size}
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="sekret", max_retries=0)
        assert client.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens >= 1


def test_stream_never_splits_a_character_and_holds_back_stop_prefixes(loaded):
    model, tok = loaded
    text = "🙂é素 ok END tail"
    script = tok.encode(text)
    assert any(tok.sp.is_byte(i) for i in script)  # the emoji arrives one byte per token
    engine = Engine(Scripted(model.config, script, prompt_len=3), tok)
    with running(create_app(engine, model_name="tiny")) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        chunks = list(client.completions.create(model="tiny", prompt=[1, 10, 11], max_tokens=len(script),
                                                temperature=0, stop="END", stream=True))
        deltas = [c.choices[0].text for c in chunks]
        assert "".join(deltas) == "🙂é素 ok "
        assert all("\ufffd" not in d for d in deltas) and len([d for d in deltas if d]) > 3
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_stops_at_the_end_marker_token(loaded):
    model, tok = loaded
    messages = [{"role": "user", "content": "hi"}]
    reply = [*tok.encode("Hi 🙂"), tok.sp.piece_to_id("<|end|>"), *tok.encode(" never shown")]
    prompt_len = len(tok.encode(format_chat(messages), bos=True))
    engine = Engine(Scripted(model.config, reply, prompt_len), tok)
    with running(create_app(engine, model_name="tiny")) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=50)
        assert out.choices[0].message.content == "Hi 🙂" and out.choices[0].finish_reason == "stop"
        assert out.usage.completion_tokens == len(tok.encode("Hi 🙂")) + 1


def test_a_failing_model_answers_500_json_and_the_server_keeps_serving(loaded):
    model, tok = loaded
    with running(create_app(Engine(Flaky(model, 0), tok), model_name="tiny")) as base:
        bad = {"model": "tiny", "prompt": [1, 13], "max_tokens": 4, "temperature": 0}
        r = httpx.post(f"{base}/v1/completions", json=bad, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "boom" in r.json()["error"]["message"]
        with httpx.stream("POST", f"{base}/v1/completions", json={**bad, "stream": True}, timeout=30) as s:
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[0][6:])["error"]["type"] == "server_error" and events[-1] == "data: [DONE]"
        good = httpx.post(f"{base}/v1/completions", json={**bad, "prompt": [1, 14]}, timeout=30)
        assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] >= 1
        assert httpx.get(f"{base}/health").status_code == 200
