"""What the endpoints share (`request.app.state.palmkit`), and the API-key check."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request

from palmkit.infer.engine import Engine
from palmkit.model.tokenizer import Tokenizer
from palmkit.serve.grounding import FaqIndex
from palmkit.serve.metrics import Metrics
from palmkit.serve.protocol import APIError


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

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def context(self) -> int:
        return self.engine.config.max_seq_len

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")


def server_state(request: Request) -> ServerState:
    return request.app.state.palmkit


def check_key(request: Request) -> None:
    key = server_state(request).api_key
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if not (scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
