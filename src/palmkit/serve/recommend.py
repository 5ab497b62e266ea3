"""`POST /v1/recommend` for a recommender folder (`palmkit recipe recommend`): a user's top k, or the top k
for a history of liked item ids.

An unknown user, a user who has liked nothing and an empty history get the most popular items with
`"personalised": false` and a `notice` that says why, the same answer `palmkit recommend` prints.
"""

from __future__ import annotations

import os
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from palmkit.errors import PalmkitError
from palmkit.infer.engine import Engine
from palmkit.recommend.recommender import load_recommender
from palmkit.serve.limits import read_json
from palmkit.serve.protocol import APIError
from palmkit.serve.schema import json_body
from palmkit.serve.state import server_state

MAX_HISTORY = 1000


class RecommendRequest(BaseModel):
    """POST /v1/recommend: a user id, or a history of liked item ids (oldest first)."""

    model_config = ConfigDict(strict=True)  # "5" is not a k, 2.5 not a user id, as the OpenAI routes answer

    model: str
    user: str | int | None = None
    history: list[str | int] | None = None
    k: int = Field(10, ge=1, le=100)
    system: Literal["combination", "lm", "retriever", "popularity"] = "combination"


def recommend_router(checkpoint: str | os.PathLike, engine: Engine) -> APIRouter:
    """`POST /v1/recommend` for a recommender folder, sharing the served model's weights."""

    recommender = load_recommender(checkpoint, model=engine.model, tokenizer=engine.tokenizer)
    router = APIRouter()

    @router.post("/v1/recommend", openapi_extra=json_body(RecommendRequest, {"user": "196", "k": 10}))
    async def recommend(request: Request) -> JSONResponse:
        """The top k items with their scores and the liked items each one came from."""
        state = server_state(request)
        with state.side.admit():
            return await _answer(state, await read_json(request, RecommendRequest, state.limits))

    async def _answer(state, body: RecommendRequest) -> JSONResponse:
        state.check_model(body.model)
        if (body.user is None) == (body.history is None):
            raise APIError(400, "give either user or history", param="user", code="invalid_value")
        if body.history is not None and len(body.history) > MAX_HISTORY:
            raise APIError(400, f"history holds at most {MAX_HISTORY} items", param="history", code="invalid_value")

        def run():
            if body.user is not None:
                return recommender.recommend(str(body.user), body.k, body.system)
            return recommender.recommend_for([str(i) for i in body.history or []], body.k, system=body.system)

        try:
            result = await state.side.run(state.engine, run)
        except PalmkitError as exc:
            raise APIError(400, str(exc), param="history", code="invalid_value") from None
        # A user's likes are theirs: naming a user id gets the ranking, not the history it came from (the
        # history and each item's "because"); a caller who sent the history gets both.
        mine = body.history is not None
        items = [item if mine else {k: v for k, v in item.items() if k != "because"} for item in result.items]
        return JSONResponse({"object": "recommendation", "model": state.model_name, "user": result.user,
                             "personalised": result.personalised, "notice": result.notice,
                             "history": result.history if mine else [],
                             "data": [{"rank": i, **item} for i, item in enumerate(items, 1)]})

    return router
