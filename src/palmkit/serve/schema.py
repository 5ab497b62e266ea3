"""The OpenAPI document (`/openapi.json`): each route's real request body and the errors it can answer.

The generation routes read their bodies themselves (`limits.read_json`: size, deadline, parsing off the event
loop), so FastAPI does not see them; `json_body(Model)` tells the document what they read. Every `/v1` route
lists the errors the guard, the limits and the engine can answer, in OpenAI's error shape (`ErrorBody`); FastAPI's
own 422 is gone (this server answers 400 for an invalid body, as OpenAI does). A streamed answer is documented
as OpenAPI 3.2 documents a sequential media type: `itemSchema` describes one server-sent event (its `data`
line holds a chunk as JSON, or `[DONE]` at the end), where a 3.1 `schema` would describe the whole stream.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

ERRORS = {
    400: "Invalid request: a malformed or out-of-range body, too many choices or messages, a prompt past the "
         "context, a Host header a loopback server does not answer to.",
    401: "Missing or wrong API key (when the server has one).",
    404: "No such model or route.",
    408: "The request body did not arrive in time.",
    413: "The request body is larger than the server's limit.",
    415: "The request body is not JSON (Content-Type must be application/json).",
    429: "The queue is full (or, for /v1/classify and /v1/recommend, as many requests as the server admits are "
         "running); retry after the Retry-After header's seconds.",
    503: "The model's engine has stopped; the server restarts.",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """An error as OpenAI writes it."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route or router: these statuses with OpenAI's error body (all of ERRORS by default)."""
    return {s: {"model": ErrorBody, "description": ERRORS[s]} for s in statuses or ERRORS}


def json_body(model: type[BaseModel], example: dict[str, Any], stream: bool = False) -> dict[str, Any]:
    """`openapi_extra=` for a route that reads a `model` JSON body itself; example: a valid body but for its
    `model` (the served model's name is filled in); stream: it may answer server-sent events instead of JSON."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    content = {"schema": schema, "example": example}
    extra: dict[str, Any] = {"requestBody": {"required": True, "content": {"application/json": content}}}
    if stream:
        extra["responses"] = {"200": {"description": "The completion: JSON, or with `stream` server-sent events.",
                                      "content": {"text/event-stream": {"itemSchema": SSE_EVENT}}}}
    return extra


SSE_EVENT = {
    "type": "object", "required": ["data"], "description": "One server-sent event (OpenAPI 3.2 `itemSchema`).",
    "properties": {
        "event": {"type": "string", "description": "Always the default, `message`."},
        "data": {"type": "string", "description": "A chunk of the response as JSON (`chat.completion.chunk` or "
                 "`text_completion`), an error as JSON (`{\"error\": ...}`), or `[DONE]` after the last chunk."},
        "id": {"type": "string"}, "retry": {"type": "integer"}}}


def openapi_document(app: FastAPI, model_name: str, keyed: bool, public: frozenset[str]) -> dict[str, Any]:
    """The app's OpenAPI document; model_name: the one `model` it accepts (others get 404); keyed: every route
    outside `public` needs `Authorization: Bearer KEY`."""
    # 3.2: the version that describes a stream's items (itemSchema); nothing else in the document differs from 3.1
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes, openapi_version="3.2.0")
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for path, operations in doc["paths"].items():
        for operation in operations.values():
            content = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
            body = content.get("schema", {})
            schemas.update(body.pop("$defs", {}))  # a body's sub-models live beside the others
            if "model" in body.get("properties", {}):
                body["properties"]["model"]["enum"] = [model_name]
                content["example"] = {"model": model_name, **content.get("example", {})}
            for parameter in operation.get("parameters", ()):
                if parameter["name"] == "model":
                    parameter["schema"]["enum"] = [model_name]
            operation["responses"].pop("422", None)
            if keyed:
                operation["security"] = [] if path in public else [{"bearer": []}]
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    if keyed:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc
