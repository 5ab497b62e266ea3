"""The server on loopback: running an app, reading its metrics, a shared server and openai client."""

import re
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest
import uvicorn

from palmkit.serve.app import create_app
from palmkit.serve.connections import uvicorn_config


@contextmanager
def running(app, send_buffer: int | None = None):
    """Serve `app` as `palmkit serve` does (its limits on connections) in a thread on a free loopback port;
    yield its base URL. send_buffer: the kernel's send buffer of each connection (accepted sockets inherit it),
    small so that a client that stops reading fills it at once."""
    sock = socket.socket()
    if send_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    sock.bind(("127.0.0.1", 0))
    limits = app.state.palmkit.limits
    server = uvicorn.Server(uvicorn_config(app, limits, log_level="warning", timeout_graceful_shutdown=2))
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


@pytest.fixture(scope="module")
def server(checkpoint):
    with running(create_app(checkpoint)) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=30)


LONG = {"model": "tiny", "prompt": "x", "max_tokens": 200, "stream": True, "ignore_eos": True}


@contextmanager
def streaming(base: str):
    """A long streaming completion that has produced its first event; leaving the block disconnects."""
    with httpx.stream("POST", f"{base}/v1/completions", json=LONG, timeout=30) as r:
        lines = r.iter_lines()  # held: a dropped line iterator closes the connection
        assert next(line for line in lines if line.startswith("data: "))
        yield r
