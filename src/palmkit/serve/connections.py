"""HTTP connections the server cannot be held by: bounded headers, a deadline for each request's head, a cap.

uvicorn's default parser (httptools) buffers a request's headers whatever their size, and no uvicorn parser
times out a connection that sends its headers a byte at a time ("slowloris"), so each such connection is held
open forever. This module serves with h11, whose parser refuses a head past `max_incomplete_event_size`
(answered 400 and closed), and adds what uvicorn lacks:
- a deadline for the request line and headers (`Limits.head_seconds`), counted from the moment the connection
  opened or its previous response ended, and not reset by data: a trickling client is closed when it passes;
- a cap on open connections (`Limits.max_connections`): more are closed at once, before anything is read;
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
import logging

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from palmkit.serve.limits import Limits

log = logging.getLogger("palmkit.serve")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a head deadline and a connection cap (set by `guarded_protocol`)."""

    head_seconds: float = Limits.head_seconds
    max_connections: int = Limits.max_connections
    send_seconds: float = Limits.send_seconds

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning("more than %d open connections: closing a new one", self.max_connections)
            transport.close()
            return
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
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
        self.transport.abort()  # connection_lost follows: the app sees the client gone

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        if not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.head_seconds, self._head_timeout)

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
                 "send_seconds": limits.send_seconds})


def uvicorn_config(app, limits: Limits, **kwargs) -> uvicorn.Config:
    """A uvicorn configuration that serves `app` within `limits` (kwargs: host, port, log_level, ...)."""
    return uvicorn.Config(app, http=guarded_protocol(limits), h11_max_incomplete_event_size=limits.max_header_bytes,
                          timeout_keep_alive=max(1, round(limits.keep_alive_seconds)), **kwargs)
