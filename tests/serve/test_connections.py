"""Connections cannot hold the server: a deadline for each request's head, bounded headers, a cap on connections."""

import socket
import time

import httpx
import pytest

from palmkit.infer.engine import Engine
from palmkit.serve.app import create_app
from palmkit.serve.limits import Limits
from tests.serve.conftest import running, wait_for

pytestmark = pytest.mark.timeout(120)


def connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def closed_by_server(sock: socket.socket, trickle: bytes = b"", seconds: float = 10) -> bool:
    """Whether the server closes `sock` within `seconds`, while we send `trickle` a byte at a time."""
    deadline = time.monotonic() + seconds
    sock.settimeout(0.05)
    for byte in (trickle[i:i + 1] for i in range(len(trickle))):
        try:
            sock.sendall(byte)
            if sock.recv(1024) == b"":
                return True
        except TimeoutError:
            pass
        except OSError:  # reset or broken pipe: closed
            return True
        if time.monotonic() > deadline:
            return False
    sock.settimeout(max(deadline - time.monotonic(), 0.01))
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


@pytest.fixture(scope="module")
def strict(loaded):
    model, tok = loaded
    limits = Limits(head_seconds=0.5, max_header_bytes=8192, max_connections=6)
    with running(create_app(Engine(model, tok), model_name="tiny", limits=limits)) as base:
        yield base


def test_a_half_sent_request_is_dropped(strict):
    with connect(strict) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert closed_by_server(sock)


def test_a_trickling_request_head_is_dropped_though_bytes_keep_coming(strict):
    with connect(strict) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        # a byte every 50 ms for up to 10 s, each one before any idle timeout could fire
        assert closed_by_server(sock, trickle=b"a" * 200)


def test_an_idle_connection_after_a_response_is_dropped(strict):
    with connect(strict) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        assert closed_by_server(sock)


def test_oversized_headers_get_400_and_the_connection_is_closed(strict):
    with connect(strict) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        sent = 0
        try:
            while sent < 64 << 20:  # the server answers long before 64 MB
                sock.sendall(b"a" * 65536)
                sent += 65536
        except OSError:
            pass
        sock.settimeout(10)
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400") and sent < 64 << 20


def test_connections_past_the_caps_may_only_ask_for_health_and_the_server_recovers(loaded):
    model, tok = loaded
    # no deadline closes anything during the test; one address may hold 4 of the 6 connections
    limits = Limits(head_seconds=60, max_connections=6, max_connections_per_ip=4)
    with running(create_app(Engine(model, tok), model_name="tiny", limits=limits)) as base:
        socks = [connect(base) for _ in range(4)]
        try:
            spare = connect(base)  # past this address's cap: asked for a completion, refused
            spare.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n'
                          b'Content-Length: 2\r\n\r\n{}')
            assert spare.recv(4096).startswith(b"HTTP/1.1 503") and closed_by_server(spare, seconds=3)
            probe = connect(base)  # past the cap too: /health is answered, then the connection closed
            probe.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert probe.recv(4096).startswith(b"HTTP/1.1 200") and closed_by_server(probe, seconds=3)
            idle = connect(base)  # asks nothing: closed after a second, not after head_seconds
            assert closed_by_server(idle, seconds=5)
            assert [closed_by_server(s, seconds=0.2) for s in socks] == [False] * 4  # the first ones are served
        finally:
            for s in socks:
                s.close()
        assert wait_for(lambda: answers(f"{base}/health"))  # once the server has seen them go


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=10).status_code == 200
    except httpx.TransportError:
        return False


def test_a_client_that_stops_reading_a_stream_is_dropped_and_its_slots_freed(loaded):
    from tests.conftest import Slow

    model, tok = loaded
    engine = Engine(Slow(model, 0.02), tok, max_batch=8, autotune=False)  # 200 steps: about 4 s or more
    limits = Limits(send_seconds=1)
    with running(create_app(engine, model_name="tiny", limits=limits), send_buffer=4096) as base:
        host, port = base.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: the window stays small
        sock.connect((host, int(port)))
        body = (b'{"model": "tiny", "prompt": "x", "max_tokens": 200, "n": 8, "logprobs": 20, "stream": true, '
                b'"ignore_eos": true}')
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        try:
            assert wait_for(lambda: engine.running == 8)
            # never read: about 1.3 MB of events against a few KB of buffers
            assert wait_for(lambda: engine.running == 0 and engine.queue_depth == 0, seconds=3)
            time.sleep(0.5)
            sock.settimeout(10)
            data = b""
            try:
                while chunk := sock.recv(65536):
                    data += chunk
            except OSError:
                pass  # reset: the server aborted the connection
            assert b"[DONE]" not in data
        finally:
            sock.close()
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200


def test_a_stream_nobody_reads_backs_up_into_the_engine_and_stops_decoding(loaded):
    """With the server's small send buffer, an unread stream fills the engine's queue for it within a few hundred
    events and the engine stops decoding it; the kernel's default buffer (grown to MBs) would take every event, so
    the whole request would be decoded for a reader that never reads."""
    model, tok = loaded
    engine = Engine(model, tok, max_batch=8, autotune=False)
    context = model.config.max_seq_len
    limits = Limits(send_seconds=60)  # the default send buffer; long enough not to drop the reader in this test
    with running(create_app(engine, model_name="tiny", limits=limits)) as base:
        host, port = base.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: the window stays small
        sock.connect((host, int(port)))
        body = (b'{"model": "tiny", "prompt": "x", "max_tokens": %d, "n": 8, "logprobs": 20, "stream": true, '
                b'"ignore_eos": true}' % (context - 4))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        try:
            assert wait_for(lambda: engine.running == 8)

            def decoded() -> int:
                return sum(len(s.tokens) for s in list(engine._active))

            before, stalled = -1, 0
            deadline = time.monotonic() + 30
            while stalled < 10 and time.monotonic() < deadline:  # one second without a decoded token
                time.sleep(0.1)
                now = decoded()
                stalled, before = (stalled + 1 if now == before else 0), now
            assert stalled == 10, "the engine kept decoding a stream nobody reads"
            assert engine.running == 8 and 0 < before < 8 * (context - 4)  # paused mid-way, slots kept
        finally:
            sock.close()
        assert wait_for(lambda: engine.running == 0, seconds=20)  # the reader left: its sequences are cancelled
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200
