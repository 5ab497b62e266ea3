"""What the endpoints share (`request.app.state.palmkit`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from palmkit.infer.engine import Engine
from palmkit.model.tokenizer import Tokenizer
from palmkit.serve.grounding import FaqIndex
from palmkit.serve.limits import Limits, check_request, max_piece_chars
from palmkit.serve.metrics import Metrics
from palmkit.serve.protocol import APIError, SamplingBody


class SideCalls:
    """Admission and fair turns for routes that use the model outside generation (/v1/classify, /v1/recommend).

    The engine runs every call waiting for it between two decode steps, so a burst of such requests would run
    in one step while every stream waits. Here at most `limit` requests are admitted at once (more get 429) and
    they hand the engine one call at a time, each a bounded slice of the work: a decode step runs between any
    two slices, and `/health` sees steps finish (busy, not wedged)."""

    def __init__(self, limit: int):
        self.limit, self.admitted = limit, 0
        self._turn = asyncio.Lock()

    @property
    def full(self) -> bool:
        return self.admitted >= self.limit

    @contextmanager
    def admit(self) -> Iterator[None]:
        """`with state.side.admit():` around a request's work; raises 429 when `limit` are already in."""
        if self.full:
            # refused before its body is read: the connection closes rather than take that body for a request
            raise APIError(429, "The server is busy; retry shortly.", "rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1", "Connection": "close"})
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    async def run(self, engine: Engine, fn: Callable[[], Any]) -> Any:
        """`fn()` on the engine thread, when no other side call is waiting there."""
        async with self._turn:
            return await engine.run(fn)


@dataclass
class ServerState:
    """What the endpoints share; `request.app.state.palmkit` holds it."""

    engine: Engine
    model_name: str
    format_chat: Callable[..., str]
    api_key: str | None
    metrics: Metrics
    created: int
    faq: FaqIndex | None = None  # with --faq: every chat request is answered from the FAQ or not at all
    limits: Limits = field(default_factory=Limits)
    piece_chars: int = field(init=False)
    """The most characters one token stands for (limits.max_piece_chars)."""
    side: SideCalls = field(init=False)
    """Admission and turns of the side routes' engine calls."""

    def __post_init__(self) -> None:
        self.piece_chars = max_piece_chars(self.tokenizer)  # at startup: a loop over the vocabulary
        self.side = SideCalls(self.limits.max_side_requests)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def context(self) -> int:
        return self.engine.config.max_seq_len

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")

    def check_request(self, body: SamplingBody) -> None:
        """Refuse a request too large for this model and server by its counts alone (limits.check_request)."""
        check_request(body, self.limits, self.context, self.engine.max_batch, self.piece_chars)


def server_state(request: Request) -> ServerState:
    return request.app.state.palmkit
