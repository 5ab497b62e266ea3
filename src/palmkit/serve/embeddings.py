"""`POST /v1/embeddings` in OpenAI's shape (infer/embeddings.py: mean-pooled, unit length).

`input` is one text, a list of texts, one list of token ids or a list of them; texts are encoded as prompts are
(BOS first, by the model's BOS rule). `encoding_format` "float" answers lists of numbers, "base64" the float32
little-endian bytes of each vector in base64, which the official `openai` client asks for by default and decodes.
Each input is one engine call between decode steps, so a long request never holds up the streams for more than
one input's forward pass.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from palmkit.infer.embeddings import embed
from palmkit.serve.limits import read_json
from palmkit.serve.protocol import APIError, _Body
from palmkit.serve.schema import json_body
from palmkit.serve.state import ServerState, server_state

MAX_INPUTS = 256  # inputs per request, as /v1/classify


class EmbeddingBody(_Body):
    """POST /v1/embeddings."""

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)  # only the model's own width: vectors are not truncated
    user: str | None = None


def _inputs(state: ServerState, body: EmbeddingBody) -> list[list[int]]:
    """Token ids of each input, refused by count and size before and after tokenizing."""
    raw = body.input
    items = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else raw
    if not items or len(items) > MAX_INPUTS:
        raise APIError(400, f"'input' must hold 1 to {MAX_INPUTS} inputs.", param="input", code="invalid_value")
    context, vocab = state.context, state.engine.vocab
    for item in items:
        if isinstance(item, str) and len(item) > context * state.piece_chars:
            raise _too_long(context, f"{len(item)} characters")
    ids = [state.tokenizer.encode_prompt(item) if isinstance(item, str) else list(item) for item in items]
    for seq in ids:
        if not seq or any(not 0 <= t < vocab for t in seq):
            raise APIError(400, f"Each input must be non-empty text or a non-empty list of ids in [0, {vocab}).",
                           param="input", code="invalid_value")
        if len(seq) > context:
            raise _too_long(context, f"{len(seq)} tokens")
    return ids


def _too_long(context: int, size: str) -> APIError:
    return APIError(400, f"This model's maximum context length is {context} tokens; an input has {size}.",
                    param="input", code="context_length_exceeded")


def _encode(vector, fmt: str) -> list[float] | str:
    if fmt == "base64":  # float32, little-endian: what the openai client decodes with numpy
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()
    return vector.tolist()


def embeddings_router() -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.post("/embeddings", openapi_extra=json_body(EmbeddingBody, {"input": "The quick brown fox"}))
    async def embeddings(request: Request) -> JSONResponse:
        """Embeddings of texts or token lists: the mean of the model's final hidden states, unit length."""
        state = server_state(request)
        with state.side.admit():  # before the body is read: a refused request costs nothing
            body = await read_json(request, EmbeddingBody, state.limits)
            state.check_model(body.model)
            width = state.engine.config.d_model
            if body.dimensions is not None and body.dimensions != width:
                raise APIError(400, f"This model's embeddings have {width} dimensions; 'dimensions' must be that "
                               "or left out.", param="dimensions", code="invalid_value")
            ids = await asyncio.to_thread(_inputs, state, body)
            vectors = [await state.side.run(state.engine, lambda seq=seq: embed(state.engine.model, seq))
                       for seq in ids]
        data = [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
                for i, v in enumerate(vectors)]
        tokens = sum(len(s) for s in ids)
        return JSONResponse({"object": "list", "data": data, "model": state.model_name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    return router
