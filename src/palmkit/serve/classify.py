"""`POST /v1/classify` for a `palmkit finetune classify` checkpoint."""

from __future__ import annotations

import os

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from palmkit.finetune.predict import load_classifier
from palmkit.infer.engine import Engine
from palmkit.serve.protocol import APIError
from palmkit.serve.state import server_state


class ClassifyRequest(BaseModel):
    """POST /v1/classify: one text or a list of them."""

    model: str
    input: str | list[str]


def classify_router(checkpoint: str | os.PathLike, engine: Engine) -> APIRouter:
    """`POST /v1/classify` for a `palmkit finetune classify` checkpoint: labels and their probabilities."""

    classifier = load_classifier(checkpoint, model=engine.model, tokenizer=engine.tokenizer)
    router = APIRouter()

    @router.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: Request) -> JSONResponse:
        state = server_state(request)
        state.check_model(body.model)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or len(texts) > 256:
            raise APIError(400, "input must hold 1 to 256 texts", param="input")
        results = await state.engine.run(lambda: classifier.predict(texts))
        return JSONResponse({"object": "list", "model": state.model_name, "labels": classifier.labels,
                             "data": [{"index": i, "label": label, "probabilities": probs}
                                      for i, (label, probs) in enumerate(results)]})

    return router
