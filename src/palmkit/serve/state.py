"""What the endpoints share (`request.app.state.palmkit`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request

from palmkit.infer.engine import Engine
from palmkit.model.tokenizer import Tokenizer
from palmkit.serve.grounding import FaqIndex
from palmkit.serve.limits import Limits, check_request, max_piece_chars
from palmkit.serve.metrics import Metrics
from palmkit.serve.protocol import APIError, SamplingBody


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

    def __post_init__(self) -> None:
        self.piece_chars = max_piece_chars(self.tokenizer)  # at startup: a loop over the vocabulary

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
