"""HTTP connections the server cannot be held by: bounded headers, a deadline for each request's head, a cap.

uvicorn's default parser (httptools) buffers a request's headers whatever their size, and no uvicorn parser
times out a connection that sends its headers a byte at a time ("slowloris"), so each such connection is held
open forever. This module serves with h11, whose parser refuses a head past `max_incomplete_event_size`
(answered 400 and closed), and adds what uvicorn lacks:
- a deadline for the request line and headers (`Limits.head_seconds`), counted from the moment the connection
  opened or its previous response ended, and not reset by data: a trickling client is closed when it passes;
- a cap on open connections (`Limits.max_connections`) and on those of one client address
  (`Limits.max_connections_per_ip`), so that one address cannot take them all. A connection past either cap is
  not closed at once: it may ask `GET /health` within a second (anything else is answered 503 and closed), so
  that a liveness probe is answered while idle sockets fill the server. At most HEALTH_SPARE such connections
  are kept; a new one closes the oldest, so idle ones cannot hold the spares either;
- a small kernel send buffer per connection (`Limits.send_buffer_bytes`), so that a stream nobody reads is
  held back in the engine's queue, where the engine sees it and stops decoding it, not in megabytes of socket;
- a deadline for a client to read its response (`Limits.send_seconds`): uvicorn stops sending while the
  transport's buffer is full and waits for the client as long as it takes, holding the response, the request's
  engine sequences and every event they keep producing. The clock runs while writing is paused (the buffer past
  its high-water mark) and stops when the client has read it down to the low-water mark; past the deadline the
  connection is aborted, which drops the buffered bytes at once (`close` would keep them until sent) and tells
  the app the client left, so a stream's sequences are cancelled and its slot is freed.
The body's own deadline is the route's (`limits.read_json`): a route that needs no body never waits for one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import time

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from palmkit.serve.limits import Limits

log = logging.getLogger("palmkit.serve")

HEALTH_SPARE = 32  # connections past the caps kept for a second in case they ask for /health
SPARE_SECONDS = 1.0


def _health_only(app):
    """An ASGI app that answers /health with `app` and anything else 503 (the server has no room)."""

    async def only_health(scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            await app(scope, receive, send)
            return
        body = json.dumps({"error": {"message": "Too many open connections; retry shortly.", "type": "server_error",
                                     "param": None, "code": "too_many_connections"}}).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                                (b"connection", b"close"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return only_health


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a head deadline and a connection cap (set by `guarded_protocol`)."""

    head_seconds: float = Limits.head_seconds
    max_connections: int = Limits.max_connections
    max_connections_per_ip: int = Limits.max_connections_per_ip
    send_seconds: float = Limits.send_seconds
    send_buffer_bytes: int = Limits.send_buffer_bytes

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer_bytes)
        self._head_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self.spare, self.opened = False, time.monotonic()
        super().connection_made(transport)
        address = self.client[0] if self.client else None
        mine = [c for c in self.connections if not getattr(c, "spare", False)]
        same = sum(1 for c in mine if c.client and c.client[0] == address) if address else 0
        if len(mine) > self.max_connections or same > self.max_connections_per_ip:
            spares = [c for c in self.connections if getattr(c, "spare", False)]
            if len(spares) >= HEALTH_SPARE:  # the oldest spare goes: idle sockets cannot keep the spares
                oldest = min(spares, key=lambda c: c.opened)
                oldest.transport.close()
            log.warning("more than %d open connections (%d from %s): this one may only ask for /health",
                        self.max_connections, self.max_connections_per_ip, address)
            self.spare = True
            self.app = _health_only(self.app)
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.spare:  # its one answer given: the room goes back
            self.transport.close()
            return
        self._arm_head_timer()  # the next request's head must arrive in time too

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_send_timer()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.send_seconds, self._send_timeout)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel_send_timer()

    def _cancel_send_timer(self) -> None:
        if getattr(self, "_send_timer", None) is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_timeout(self) -> None:
        self._send_timer = None
        log.warning("a client read none of its response for %g s: dropping the connection", self.send_seconds)
        sock = self.transport.get_extra_info("socket")
        if sock is not None:  # reset, not closed: the kernel would keep trying to send what it holds
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()  # connection_lost follows: the app sees the client gone

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        if not self.transport.is_closing():
            seconds = min(self.head_seconds, SPARE_SECONDS) if self.spare else self.head_seconds
            self._head_timer = self.loop.call_later(seconds, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # its head arrived: the request is being served
        if not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(limits: Limits) -> type[GuardedH11Protocol]:
    """The protocol class with these limits (uvicorn makes one instance per connection)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"head_seconds": limits.head_seconds, "max_connections": limits.max_connections,
                 "max_connections_per_ip": limits.max_connections_per_ip, "send_seconds": limits.send_seconds,
                 "send_buffer_bytes": limits.send_buffer_bytes})


def uvicorn_config(app, limits: Limits, **kwargs) -> uvicorn.Config:
    """A uvicorn configuration that serves `app` within `limits` (kwargs: host, port, log_level, ...)."""
    return uvicorn.Config(app, http=guarded_protocol(limits), h11_max_incomplete_event_size=limits.max_header_bytes,
                          timeout_keep_alive=max(1, round(limits.keep_alive_seconds)), **kwargs)
