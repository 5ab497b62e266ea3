"""The app: JSON errors, a full queue, the API key, extra routers, a failing model, a dead or wedged engine, and the
web chat page."""

import itertools
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from fastapi import APIRouter, Request

from palmkit.infer.engine import Engine, EngineOptions, EngineStopped
from palmkit.model.checkpoint import load_checkpoint
from palmkit.serve import app as app_module
from palmkit.serve.app import ServerOptions, create_app, serve
from palmkit.serve.grounding import NO_ANSWER
from palmkit.serve.limits import Limits
from tests.conftest import Slow
from tests.serve.conftest import metric, running, streaming, wait_for

pytestmark = pytest.mark.timeout(120)


def test_unknown_routes_and_methods_answer_json(server):
    r = httpx.get(f"{server}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = httpx.get(f"{server}/v1/completions")
    assert r.status_code == 405 and "error" in r.json()
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0).models.retrieve("gpt-4")


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
            # full, not wedged: a liveness probe must not restart a server that is only busy
            health = httpx.get(f"{base}/health")
            assert health.status_code == 200 and health.json() == {"status": "busy"}
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


class Flaky(Slow):
    """The same model, failing on any input that contains token 13."""

    def hidden_states(self, idx, *args, **kwargs):
        if (idx == 13).any():
            raise RuntimeError("boom")
        return super().hidden_states(idx, *args, **kwargs)


def test_a_failing_model_answers_a_generic_500_with_a_request_id_and_the_server_keeps_serving(loaded, caplog):
    model, tok = loaded
    with running(create_app(Engine(Flaky(model, 0), tok), model_name="tiny")) as base:
        bad = {"model": "tiny", "prompt": [1, 13], "max_tokens": 4, "temperature": 0}
        r = httpx.post(f"{base}/v1/completions", json=bad, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        # the exception's text stays in the log, under the id the client is given
        rid = r.headers["x-request-id"]
        assert "boom" not in r.text and rid in r.json()["error"]["message"]
        assert any(rid in rec.getMessage() and "boom" in rec.getMessage() for rec in caplog.records)
        with httpx.stream("POST", f"{base}/v1/completions", json={**bad, "stream": True}, timeout=30) as s:
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        error = json.loads(events[0][6:])["error"]
        assert error["type"] == "server_error" and "boom" not in error["message"] and events[-1] == "data: [DONE]"
        good = httpx.post(f"{base}/v1/completions", json={**bad, "prompt": [1, 14]}, timeout=30)
        assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] >= 1
        assert httpx.get(f"{base}/health").status_code == 200


# --------------------------------------------------------------------------------------------------
# The web chat page


def test_malformed_requests_and_the_page(checkpoint, faq_file):
    app = create_app(checkpoint, faq=faq_file)
    with running(app) as base:
        post = lambda body: httpx.post(f"{base}/v1/chat/completions", content=body, timeout=30,
                                       headers={"Content-Type": "application/json"})
        no_user = post(json.dumps({"model": "tiny", "messages": [{"role": "system", "content": "hi"}]}))
        assert no_user.status_code == 400 and no_user.json()["error"]["param"] == "messages"
        assert "needs a user message" in no_user.json()["error"]["message"]
        assert post("{not json").status_code == 400
        assert post(json.dumps({"model": "tiny", "messages": []})).status_code == 400
        assert post(json.dumps({"model": "tiny", "messages": "hi"})).status_code == 400
        # a raw completion would bypass the FAQ: refused, the chat route named
        raw = httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "How do I reset?"}, timeout=30)
        assert raw.status_code == 400 and raw.json()["error"]["code"] == "faq_only"
        page = httpx.get(base + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    config = json.loads(page.text.split('type="application/json">')[1].split("</script>")[0])
    assert config == {"model": "tiny", "faq": {"name": "faq.csv", "entries": 3}, "api_key_required": False}
    assert "http://" not in page.text and "https://" not in page.text  # nothing loads from elsewhere


def test_page_without_faq_and_plain_chat(checkpoint):
    app = create_app(checkpoint, model_name="m</script>")
    with running(app) as base:
        page = httpx.get(base + "/").text
        body = {"model": "m</script>", "max_tokens": 3, "messages": [{"role": "user", "content": "Tell me a joke"}]}
        reply = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30).json()
    config = json.loads(page.split('type="application/json">')[1].split("</script>")[0])
    assert config["faq"] is None and config["model"] == "m</script>"  # escaped inside the script element
    assert "faq" not in reply and reply["choices"][0]["message"]["content"] != NO_ANSWER


# --------------------------------------------------------------------------------------------------
# The page in a real browser


def chromium_driver():
    """Headless Chromium from Debian's packages, driven by Selenium without its downloader."""
    if not (shutil.which("chromium") and Path("/usr/bin/chromedriver").exists()):
        pytest.fail("the browser test needs Debian's chromium and chromium-driver: install.sh installs them "
                    "(as root), or run: apt-get install -y chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def ask_in_page(driver, question: str) -> tuple[list[str], str]:
    """Type a question, press Send; (distinct partial answers seen while it streamed, final answer)."""
    from selenium.webdriver.common.by import By

    before = len(driver.find_elements(By.CSS_SELECTOR, ".answer"))
    driver.find_element(By.ID, "question").send_keys(question)
    driver.find_element(By.ID, "send").click()
    partial: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = driver.execute_script(
            "const a = document.querySelectorAll('.answer'); const e = a[a.length - 1];"
            f"return a.length > {before} ? [e.dataset.state, e.textContent] : null;")
        if state:
            if state[1] and (not partial or partial[-1] != state[1]):
                partial.append(state[1])
            if state[0] != "streaming":
                return partial, state[1]
        time.sleep(0.01)
    raise AssertionError("the answer did not finish in 60 s")


def test_browser_streams_a_grounded_answer(checkpoint, faq_file):
    model, tokenizer, _ = load_checkpoint(checkpoint)
    engine = Engine(Slow(model, 0.08), tokenizer, max_batch=2, autotune=False)  # slow enough to watch it stream
    app = create_app(engine, faq=faq_file)
    question = "I forgot my password"
    driver = chromium_driver()
    try:
        with running(app) as base:
            driver.get(f"{base}/?max_tokens=16")
            partial, final = ask_in_page(driver, question)
            source = driver.execute_script("return document.querySelector('.assistant .source').textContent")
            reference = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
                "model": "palmkit", "temperature": 0, "max_tokens": 16,
                "messages": [{"role": "user", "content": question}]}).json()["choices"][0]["message"]["content"]
            _, declined = ask_in_page(driver, "What is the capital of France?")
            _, too_long = ask_in_page(driver, "password " * 300)
            error = driver.execute_script("const e = document.querySelectorAll('.error'); "
                                          "return e.length ? e[e.length - 1].textContent : null")
    finally:
        driver.quit()
    assert len(partial) >= 4, partial  # the text grew in steps while the page read the stream
    assert all(b.startswith(a) for a, b in itertools.pairwise(partial))
    assert final == reference and final
    assert source == 'Source: \u201cHow do I reset my password?\u201d (faq.csv:2)'
    assert declined == NO_ANSWER
    assert too_long == "" and error.startswith("Error 400: This model's maximum context length is 256 tokens")


def test_cors_origins_let_those_pages_call_the_api_and_no_others(loaded):
    model, tok = loaded
    page = "https://app.example.com"
    preflight = {"Origin": page, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    body = {"model": "tiny", "prompt": "x", "max_tokens": 1}
    with running(create_app(Engine(model, tok, autotune=False), model_name="tiny", api_key="k",
                            cors_origins=[page])) as base:
        r = httpx.options(f"{base}/v1/completions", headers=preflight)  # no key: a browser sends none here
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = httpx.post(f"{base}/v1/completions", json=body, headers={"Origin": page, "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page
        r = httpx.post(f"{base}/v1/completions", json=body, headers={"Origin": page})  # the page may read the 401
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == page
        other = httpx.options(f"{base}/v1/completions", headers={**preflight, "Origin": "https://evil.example"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    with running(create_app(Engine(model, tok, autotune=False), model_name="tiny")) as base:  # no origins: no CORS
        r = httpx.post(f"{base}/v1/completions", json=body, headers={"Origin": page})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


# --------------------------------------------------------------------------------------------------
# A dead or wedged engine


class Fatal(BaseException):
    """Not an Exception: nothing in the engine catches it, so its thread dies (as on a fatal runtime error)."""


class Dying(Slow):
    """The same model; its engine thread dies on any input that contains token 13."""

    def hidden_states(self, idx, *args, **kwargs):
        if (idx == 13).any():
            raise Fatal("the engine thread dies")
        return super().hidden_states(idx, *args, **kwargs)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_engine_answers_503_on_every_route_and_reports_its_death(loaded):
    model, tok = loaded
    router = APIRouter(prefix="/v1")

    @router.get("/vocab")
    async def vocab(request: Request) -> dict:
        state = request.app.state.palmkit
        return {"vocab": await state.engine.run(lambda: state.engine.vocab)}  # run: the engine thread's work

    deaths = []
    app = create_app(Engine(Dying(model, 0), tok, autotune=False), model_name="tiny", routers=[router],
                     on_engine_death=lambda: deaths.append(1))
    with running(app) as base:
        r = httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": [1, 13], "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_stopped"
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
        for method, path, body in (("POST", "/v1/completions", {"model": "tiny", "prompt": "x"}),
                                   ("POST", "/v1/chat/completions", chat), ("GET", "/v1/models", None),
                                   ("GET", "/v1/vocab", None)):
            r = httpx.request(method, base + path, json=body, timeout=30)
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_stopped", path
        assert httpx.get(f"{base}/health").json() == {"status": "engine stopped"}
        assert wait_for(lambda: deaths == [1])


def test_engine_run_after_the_engine_died_is_refused_not_left_waiting(loaded):
    model, tok = loaded
    engine = Engine(model, tok, autotune=False).start()
    engine.stop()
    with pytest.raises(EngineStopped):
        engine.call(lambda: 1)


class Stuck(Slow):
    """The same model, stuck (until released) on any input that contains token 13."""

    def __init__(self, inner):
        super().__init__(inner, 0)
        self.release = threading.Event()

    def hidden_states(self, idx, *args, **kwargs):
        if (idx == 13).any():
            assert self.release.wait(60)
        return super().hidden_states(idx, *args, **kwargs)


def test_health_reports_a_wedged_engine(loaded):
    model, tok = loaded
    stuck = Stuck(model)
    app = create_app(Engine(stuck, tok, autotune=False), model_name="tiny", limits=Limits(wedge_seconds=0.2))
    with running(app) as base, ThreadPoolExecutor(1) as pool:
        assert httpx.get(f"{base}/health").status_code == 200  # idle is not wedged, however long
        held = pool.submit(httpx.post, f"{base}/v1/completions", timeout=60,
                           json={"model": "tiny", "prompt": [1, 13], "max_tokens": 2})
        try:
            assert wait_for(lambda: httpx.get(f"{base}/health").json() == {"status": "engine wedged"})
            assert httpx.get(f"{base}/health").status_code == 503
        finally:
            stuck.release.set()
        assert held.result(timeout=60).status_code == 200
        assert wait_for(lambda: httpx.get(f"{base}/health").status_code == 200)


class Dead(Slow):
    """An engine thread with this model dies at its first forward pass (the startup timing of decode steps)."""

    def hidden_states(self, *args, **kwargs):
        raise Fatal("the engine thread dies")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_serve_exits_with_status_1_when_the_engine_dies(checkpoint, monkeypatch):
    model, tok, _ = load_checkpoint(checkpoint)
    monkeypatch.setattr(app_module, "load_engine", lambda *args: (Engine(Dead(model, 0), tok), {}))
    with pytest.raises(SystemExit) as exit_:
        serve(str(checkpoint), port=0)
    assert exit_.value.code == 1


def test_cors_for_any_origin_without_a_key_is_warned_about(loaded, caplog):
    model, tok = loaded
    with caplog.at_level("WARNING", logger="palmkit.serve"):
        create_app(Engine(model, tok, autotune=False), model_name="tiny", cors_origins=["*"], api_key="k")
        assert "cors_origins" not in caplog.text
        create_app(Engine(model, tok, autotune=False), model_name="tiny", cors_origins=["*"])
    assert "--server.cors_origins '*' without an API key" in caplog.text


def test_serve_threads_every_engine_option_to_a_tensor_parallel_engine(checkpoint, monkeypatch):
    seen = []
    # rank 1 of a group: it gets no engine and returns once rank 0 lets it go
    monkeypatch.setattr(app_module, "tensor_parallel_engine", lambda *args: seen.append(args) or (None, {}))
    options = EngineOptions(dtype="bfloat16", max_queue=5, prefill_tokens=7)
    serve(str(checkpoint), engine=options, tp=2, server=ServerOptions(vocab_parallel=False))
    assert seen == [(str(checkpoint), 2, options, False)]
    assert options.max_batch is None  # the documented default batch, decided where the model's memory is known
