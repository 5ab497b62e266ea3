"""`POST /v1/classify` for a `palmkit finetune classify` checkpoint."""

from __future__ import annotations

import os

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from palmkit.finetune.predict import load_classifier
from palmkit.infer.engine import Engine
from palmkit.serve.limits import cut_text, read_json
from palmkit.serve.protocol import APIError
from palmkit.serve.schema import json_body
from palmkit.serve.state import server_state

MAX_TEXTS = 256
SLICE = 16  # texts per engine call: a decode step runs between two slices of a long request


class ClassifyRequest(BaseModel):
    """POST /v1/classify: one text or a list of them."""

    model: str
    input: str | list[str]


def classify_router(checkpoint: str | os.PathLike, engine: Engine) -> APIRouter:
    """`POST /v1/classify` for a `palmkit finetune classify` checkpoint: labels and their probabilities."""

    classifier = load_classifier(checkpoint, model=engine.model, tokenizer=engine.tokenizer)
    router = APIRouter()

    @router.post("/v1/classify", openapi_extra=json_body(ClassifyRequest, {"input": "The service was quick."}))
    async def classify(request: Request) -> JSONResponse:
        """Labels and their probabilities for one text or up to 256."""
        state = server_state(request)
        with state.side.admit():  # before the body is read: a refused request costs nothing
            body = await read_json(request, ClassifyRequest, state.limits)
            state.check_model(body.model)
            texts = [body.input] if isinstance(body.input, str) else body.input
            if not texts or len(texts) > MAX_TEXTS:
                raise APIError(400, f"input must hold 1 to {MAX_TEXTS} texts", param="input", code="invalid_value")
            # the classifier reads the first max_len tokens: the rest of a long text is never tokenized
            texts = [cut_text(t, classifier.max_len, state.piece_chars) for t in texts]
            results = []
            for start in range(0, len(texts), SLICE):
                part = texts[start:start + SLICE]
                results += await state.side.run(state.engine, lambda part=part: classifier.predict(part))
        return JSONResponse({"object": "list", "model": state.model_name, "labels": classifier.labels,
                             "data": [{"index": i, "label": label, "probabilities": probs}
                                      for i, (label, probs) in enumerate(results)]})

    return router
