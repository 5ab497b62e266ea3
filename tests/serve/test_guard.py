"""The guard in front of every route: the key before the body, the key on /metrics and the docs, JSON bodies only,
the loopback Host check, and request ids on generic 500s."""

import socket

import httpx
import pytest
from fastapi import APIRouter
from pydantic import BaseModel
from starlette.testclient import TestClient

from palmkit.infer.engine import Engine
from palmkit.serve import app as app_module
from palmkit.serve.app import ServerOptions, create_app, serve
from palmkit.serve.connections import GuardedH11Protocol
from palmkit.serve.guard import LOOPBACK_NAMES
from palmkit.serve.limits import Limits
from tests.serve.conftest import running

pytestmark = pytest.mark.timeout(120)

KEY = {"Authorization": "Bearer sekret"}


def raw_request(base: str, head: str, timeout: float = 10) -> bytes:
    """Send a request's head alone (no body, whatever its Content-Length says); what the server answers before it
    closes the connection (as it does after refusing a request whose body it did not read)."""
    host, port = base.removeprefix("http://").split(":")
    answer = b""
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head.encode())
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except TimeoutError:
            pass
    return answer


class Echo(BaseModel):
    text: str


def test_the_key_is_checked_before_the_body_is_read(loaded):
    model, tok = loaded
    router = APIRouter()

    @router.post("/v1/echo")
    async def echo(body: Echo) -> dict:  # FastAPI reads and parses a declared body before any dependency runs
        return {"text": body.text}

    with running(create_app(Engine(model, tok), model_name="tiny", api_key="sekret", routers=[router])) as base:
        for path in ("/v1/echo", "/v1/completions"):
            # 50 MB announced and none sent: the answer comes without waiting for a byte of it
            answer = raw_request(base, f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                       "Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 401") and b"invalid_api_key" in answer, path
        assert httpx.post(f"{base}/v1/echo", json={"text": "hi"}, headers=KEY).json() == {"text": "hi"}


def test_metrics_and_the_openapi_document_need_the_key_and_the_docs_are_off(loaded):
    model, tok = loaded
    with running(create_app(Engine(model, tok), model_name="tiny", api_key="sekret")) as base:
        for path in ("/metrics", "/openapi.json", "/v1/models"):
            assert httpx.get(base + path).status_code == 401, path
            assert httpx.get(base + path, headers=KEY).status_code == 200, path
        assert httpx.get(base + "/docs", headers=KEY).status_code == 404
        assert httpx.get(base + "/health").status_code == 200 and httpx.get(base + "/").status_code == 200
    with running(create_app(Engine(model, tok), model_name="tiny")) as base:  # no key: the docs are on
        assert httpx.get(base + "/docs").status_code == 200 and httpx.get(base + "/metrics").status_code == 200


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_bodies_that_are_not_json_get_415(server, content_type):
    # what an HTML form or a simple cross-site fetch can send without a CORS preflight
    headers = {"Content-Type": content_type} if content_type else {}
    body = b'{"model": "tiny", "prompt": "x", "max_tokens": 1}'
    r = httpx.post(f"{server}/v1/completions", content=body, headers=headers)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    json_type = {"Content-Type": "application/json; charset=utf-8"}
    ok = httpx.post(f"{server}/v1/completions", content=body, headers=json_type)
    assert ok.status_code == 200


def test_a_loopback_server_answers_only_to_loopback_host_names(loaded):
    model, tok = loaded
    with running(create_app(Engine(model, tok), model_name="tiny", allowed_hosts=LOOPBACK_NAMES)) as base:
        port = base.rsplit(":", 1)[1]
        # a rebound DNS name reaches 127.0.0.1 but keeps its own name in the Host header
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
            r = httpx.get(f"{base}/v1/models", headers={"Host": host})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", host
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
            assert httpx.get(f"{base}/v1/models", headers={"Host": host}).status_code == 200, host


def test_serve_on_loopback_checks_the_host_and_bounds_connections(checkpoint, monkeypatch):
    configs = []

    class Recorder:
        def __init__(self, config):
            configs.append(config)

        def run(self):
            pass

    monkeypatch.setattr(app_module.uvicorn, "Server", Recorder)
    serve(str(checkpoint), host="127.0.0.1", port=1, server=ServerOptions(allowed_hosts="proxy.internal"),
          limits=Limits(max_header_bytes=4096))
    config = configs[0]
    assert issubclass(config.http, GuardedH11Protocol) and config.h11_max_incomplete_event_size == 4096
    with TestClient(config.app, base_url="http://evil.example") as client:
        assert client.get("/v1/models").status_code == 400
        assert client.get("/v1/models", headers={"Host": "proxy.internal"}).status_code == 200
    serve(str(checkpoint), host="0.0.0.0", port=1)  # other addresses: any name (a key is the protection there)
    with TestClient(configs[1].app, base_url="http://example.com") as client:
        assert client.get("/v1/models").status_code == 200


def test_an_unexpected_error_answers_a_generic_500_and_logs_it_under_the_request_id(loaded, caplog):
    model, tok = loaded
    router = APIRouter()

    @router.get("/v1/broken")
    async def broken() -> dict:
        raise RuntimeError("secret internal detail")

    with running(create_app(Engine(model, tok), model_name="tiny", routers=[router])) as base:
        r = httpx.get(f"{base}/v1/broken")
    assert r.status_code == 500 and "secret" not in r.text
    rid = r.headers["x-request-id"]
    assert rid in r.json()["error"]["message"]
    logged = [rec for rec in caplog.records if rid in rec.getMessage()]
    assert logged and "secret internal detail" in str(logged[0].exc_info[1])
