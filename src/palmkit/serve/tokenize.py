"""`POST /tokenize` and `POST /detokenize` in vLLM's shapes, so that a client can count tokens against the context.

`/tokenize` takes a `prompt` (encoded as /v1/completions encodes it: BOS first when `add_special_tokens`, the
default) or chat `messages` with optional `tools` (encoded as /v1/chat/completions encodes them, so `count` equals
that request's `usage.prompt_tokens`; a `--faq` server adds the FAQ's entries to a chat, which this count leaves
out), and answers `{"count", "max_model_len", "tokens", "token_strs"}`. `/detokenize` turns `tokens` back into
`{"prompt"}`. Both are bounded as the generation routes are (body size, characters against the context) and run
on a worker thread.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from palmkit.model.chat_template import encode_chat
from palmkit.serve.limits import read_json
from palmkit.serve.protocol import APIError, ChatMessage, Tool, _Body
from palmkit.serve.schema import json_body
from palmkit.serve.state import ServerState, server_state
from palmkit.serve.tools import chat_messages


class TokenizeBody(_Body):
    """POST /tokenize: a `prompt` or chat `messages` (with `tools`), not both."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[Tool] | None = None
    add_special_tokens: bool = True  # prompts: BOS first, as /v1/completions encodes them
    add_generation_prompt: bool = True  # messages: end with the assistant marker, as /v1/chat/completions does
    return_token_strs: bool = False


class DetokenizeBody(_Body):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)


def _tokenize(state: ServerState, body: TokenizeBody) -> list[int]:
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "Send either 'prompt' or 'messages'.", param="prompt", code="invalid_value")
    texts = [body.prompt] if body.prompt is not None else [str(m.content or "") for m in body.messages or ()]
    limit = (state.context + 1) * state.piece_chars  # anything longer cannot be counted as fitting anyway
    if len(body.messages or ()) > state.limits.max_messages or sum(len(t) for t in texts) > limit:
        raise APIError(400, f"The text is longer than this model's context of {state.context} tokens can hold.",
                       param="messages" if body.messages else "prompt", code="context_length_exceeded")
    if body.prompt is not None:
        return state.tokenizer.encode(body.prompt, bos=body.add_special_tokens and state.tokenizer.add_bos)
    return encode_chat(state.tokenizer, chat_messages(body.messages or [], body.tools),
                       add_generation_prompt=body.add_generation_prompt,
                       template=state.format_chat)


def tokenize_router() -> APIRouter:
    router = APIRouter()

    @router.post("/tokenize", openapi_extra=json_body(TokenizeBody, {"prompt": "Hello world"}))
    async def tokenize(request: Request) -> JSONResponse:
        """Token ids of a prompt or a conversation, as the generation routes encode them."""
        state = server_state(request)
        body = await read_json(request, TokenizeBody, state.limits)
        if body.model is not None:
            state.check_model(body.model)
        ids = await asyncio.to_thread(_tokenize, state, body)
        strs = [state.tokenizer.piece(i) for i in ids] if body.return_token_strs else None
        return JSONResponse({"count": len(ids), "max_model_len": state.context, "tokens": ids, "token_strs": strs})

    @router.post("/detokenize", openapi_extra=json_body(DetokenizeBody, {"tokens": [1, 100, 200]}))
    async def detokenize(request: Request) -> JSONResponse:
        """The text of token ids (special tokens dropped)."""
        state = server_state(request)
        body = await read_json(request, DetokenizeBody, state.limits)
        if body.model is not None:
            state.check_model(body.model)
        vocab = state.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"Token ids must be in [0, {vocab}).", param="tokens", code="invalid_value")
        return JSONResponse({"prompt": await asyncio.to_thread(state.tokenizer.decode, body.tokens)})

    return router
