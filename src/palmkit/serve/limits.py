"""What one client may ask of the server, and the cheap checks that refuse the rest before any work is done.

A request is refused by its size alone before it is parsed, tokenized or grounded: the body by its bytes, a
prompt by its characters (a token covers at most `max_piece_chars` characters of the lossless tokenizer, so a
longer text cannot fit the context whatever it says), a request by its choices (prompts x n) and messages.
What is left to do for an accepted request (JSON parsing, tokenizing, FAQ retrieval) runs on worker threads,
so the event loop keeps answering `/health` and streaming other responses meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel

from palmkit.model.tokenizer import Tokenizer
from palmkit.serve.protocol import (
    MAX_BODY_BYTES,
    APIError,
    ChatBody,
    CompletionBody,
    SamplingBody,
    parse_body,
    read_body,
)

T = TypeVar("T", bound=BaseModel)


@dataclass(frozen=True)
class Limits:
    """Bounds on what clients may send and hold; past them a request is refused or a connection closed."""

    max_body_bytes: int = MAX_BODY_BYTES
    """Largest request body; a longer one gets 413 before it is read (its Content-Length says so) or as soon as
    it passes the bound."""
    max_messages: int = 256
    """Chat messages per request."""
    max_stop: int = 16
    """Stop strings per request."""
    max_stop_chars: int = 256
    """Characters per stop string."""
    max_header_bytes: int = 16 << 10
    """Request line and headers together; past it the connection gets 400 and is closed."""
    max_connections: int = 512
    """Open connections; more may only ask for /health (within a second; serve/connections.py)."""
    max_connections_per_ip: int = 256
    """Open connections from one client address; more may only ask for /health, as past max_connections."""
    head_seconds: float = 10.0
    """A request's line and headers must have arrived this long after the connection opened (or the previous
    response ended), else the connection is closed: a client that sends a byte now and then holds nothing."""
    body_seconds: float = 30.0
    """A request's body must have arrived this long after its headers, else 408."""
    keep_alive_seconds: float = 5.0
    """An idle connection between requests is closed after this long."""
    wedge_seconds: float = 120.0
    """/health answers 503 when work is waiting and the engine has not finished a step for this long."""
    send_seconds: float = 30.0
    """A client that reads nothing of its response for this long (the server's send buffer stays full) is
    dropped: its connection is aborted, its sequences cancelled and what was waiting to be sent is freed."""
    send_buffer_bytes: int = 64 << 10
    """The kernel's send buffer of each connection (SO_SNDBUF). Left to itself Linux grows it to 4 MiB, which takes
    thousands of streamed events from a client that reads none of them; kept small, an unread stream backs up into
    the engine's queue within a few hundred events, and the engine stops decoding it until it is read."""
    max_logprob_values: int = 1 << 17
    """Log-probabilities one response may hold: tokens (echoed prompt and completion) x (logprobs + 1) x
    choices, counted before any work (about 30 bytes each in JSON)."""
    max_side_requests: int = 16
    """Requests of the engine's side routes (/v1/classify, /v1/recommend) admitted at once; more get 429. They
    run one engine call at a time, a bounded slice each, between decode steps."""

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"limits.{name} must be positive, got {value}")


@functools.cache
def max_piece_chars(tokenizer: Tokenizer) -> int:
    """The most characters one token of `tokenizer` stands for. Byte pieces (`<0x41>`) stand for less than one
    character and control pieces for none; every other piece is the text it matches (whitespace included: the
    tokenizer is lossless), so a text of c characters is at least c / max_piece_chars tokens."""
    sp = tokenizer.sp
    return max(len(sp.id_to_piece(i)) for i in range(sp.get_piece_size())
               if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i)))


def check_request(body: SamplingBody, limits: Limits, context: int, max_choices: int, piece_chars: int) -> None:
    """Refuse a request that cannot be served by its counts alone, before anything is tokenized."""
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    if len(stop) > limits.max_stop:
        raise APIError(400, f"At most {limits.max_stop} stop strings.", param="stop", code="invalid_value")
    if any(len(s) > limits.max_stop_chars for s in stop):
        raise APIError(400, f"Stop strings are at most {limits.max_stop_chars} characters.", param="stop",
                       code="invalid_value")
    if isinstance(body, ChatBody):
        if len(body.messages) > limits.max_messages:
            raise APIError(400, f"At most {limits.max_messages} messages per request.", param="messages",
                           code="invalid_value")
        texts = [m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or ())
                 for m in body.messages]
        prompts, param = [texts], "messages"
    elif isinstance(body, CompletionBody):
        prompt = body.prompt
        prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
        param = "prompt"
    else:
        return
    if len(prompts) * (body.n or 1) > max_choices:
        raise APIError(400, f"At most {max_choices} choices (prompts x n) per request.", param="n",
                       code="invalid_value")
    for prompt in prompts:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            size, unit, bound = len(prompt), "tokens", context
        else:
            size = len(prompt) if isinstance(prompt, str) else sum(len(t) for t in prompt)
            unit, bound = "characters", context * piece_chars
        if size > bound:
            raise APIError(400, f"This model's maximum context length is {context} tokens ({bound} {unit}); "
                           f"your {param} has {size} {unit}.", param=param, code="context_length_exceeded")


def check_logprob_values(tokens: int, per_token: int, limits: Limits) -> None:
    """Refuse a response that would hold more than `limits.max_logprob_values` log-probabilities: `tokens`
    (echoed prompts and completion budgets of every choice) with `per_token` values each, known before any work."""
    if tokens * per_token > limits.max_logprob_values:
        raise APIError(400, f"This request asks for up to {tokens * per_token} log-probabilities ({tokens} tokens "
                       f"x {per_token}); the server answers at most {limits.max_logprob_values} per request. Send "
                       "fewer prompts or tokens per request, or ask for fewer alternatives.", param="logprobs",
                       code="logprobs_too_large")


async def read_json(request: Request, model: type[T], limits: Limits) -> T:
    """The request's JSON body as `model`: at most `limits.max_body_bytes`, in `limits.body_seconds`, parsed on a
    worker thread."""
    try:
        raw = await asyncio.wait_for(read_body(request, limits.max_body_bytes), limits.body_seconds)
    except TimeoutError:
        raise APIError(408, f"The request body did not arrive within {limits.body_seconds:g} s.",
                       code="request_timeout", headers={"Connection": "close"}) from None
    return await asyncio.to_thread(parse_body, model, raw)


def cut_text(text: str, tokens: int, piece_chars: int) -> str:
    """The part of `text` that can hold its first `tokens` tokens (with room to spare, so that cutting does not
    change how they are split): what a model that truncates reads, without tokenizing the rest."""
    return text[: 2 * (tokens + 1) * piece_chars]
