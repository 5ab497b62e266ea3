"""What every request passes before a route reads a byte of its body: Host, API key, engine, Content-Type, size.

The checks run in an ASGI middleware, in front of routing, so no route can forget one or read a body first:
- Host: a server bound to loopback answers only to loopback names. Otherwise a web page the user visits can
  rebind its own domain name to 127.0.0.1 and read the answers (DNS rebinding); its requests carry that domain
  in the Host header, which a browser does not let a page change.
- the API key on every route but the chat page and /health (so /metrics, /docs and /openapi.json need it);
- the engine: once its thread has died every model route answers 503, whatever it would have done;
- a body must be JSON (`Content-Type: application/json`), else 415: an HTML form or a `fetch` without CORS
  preflight cannot send that type cross-site, so a page cannot make a visitor's browser use the server blindly;
- a body whose Content-Length passes `limits.max_body_bytes` gets 413 unread (and the connection is closed).
Every response carries an `X-Request-Id`; an unexpected error answers a generic 500 that names it, and the
log has the traceback under the same id.
"""

from __future__ import annotations

import hmac
import logging
import uuid
from collections.abc import Iterable

from palmkit.infer.engine import Engine
from palmkit.serve.protocol import APIError
from palmkit.serve.state import ServerState

log = logging.getLogger("palmkit.serve")

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")

PUBLIC_PATHS = frozenset({"/", "/health"})  # no API key: the chat page asks for the key itself


def request_id(scope: dict) -> str:
    return scope.get("palmkit.request_id", "-")


def server_error(scope: dict) -> APIError:
    """The generic 500: the client learns the request id, the log (written by the caller) the details."""
    rid = request_id(scope)
    return APIError(500, f"The server had an error while processing your request (request id {rid}).",
                    "server_error", headers={"X-Request-Id": rid})


def engine_stopped() -> APIError:
    return APIError(503, "The model's engine has stopped; the server is restarting. Retry shortly.", "server_error",
                    code="engine_stopped", headers={"Retry-After": "5"})


def generation_failed(scope: dict, engine: Engine, detail: str) -> APIError:
    """What a client is told when its generation failed: 503 if the engine died, else the generic 500."""
    log.error("request %s: %s", request_id(scope), detail)
    return engine_stopped() if not engine.alive else server_error(scope)


def _host(headers: dict[bytes, bytes]) -> str:
    host = headers.get(b"host", b"").decode("latin-1").strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


class Guard:
    """ASGI middleware: request ids, then the Host, key, engine, Content-Type and size checks (module docstring)."""

    def __init__(self, app, state: ServerState, allowed_hosts: Iterable[str] | None = None):
        self.app, self.state = app, state
        self.allowed_hosts = None if allowed_hosts is None else frozenset(h.lower() for h in allowed_hosts)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = scope["palmkit.request_id"] = uuid.uuid4().hex[:16]

        async def send_with_id(message) -> None:
            headers = message.get("headers", ())
            if message["type"] == "http.response.start" and not any(k == b"x-request-id" for k, _ in headers):
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            await send(message)

        error = self.refusal(scope)
        if error is not None:
            await error.response()(scope, receive, send_with_id)
            return
        await self.app(scope, receive, send_with_id)

    def refusal(self, scope: dict) -> APIError | None:
        """Why the request is refused before any work, or None."""
        headers = dict(scope["headers"])
        path, state = scope["path"], self.state
        # a body left unread on the connection would be taken for the next request: close it after refusing
        has_body = headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers
        close = {"Connection": "close"} if has_body else {}
        if self.allowed_hosts is not None and _host(headers) not in self.allowed_hosts:
            return APIError(400, "This server answers only to requests addressed to "
                            f"{', '.join(sorted(self.allowed_hosts))} (Host header).", code="invalid_host",
                            headers=close)
        if state.api_key is not None and path not in PUBLIC_PATHS:
            scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if not (scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1"),
                                                                       state.api_key.encode())):
                return APIError(401, "Incorrect API key provided.", code="invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer", **close})
        if path.startswith("/v1/") and not state.engine.alive:
            error = engine_stopped()
            error.headers = {**error.headers, **close}
            return error
        if has_body:
            media_type = headers.get(b"content-type", b"").decode("latin-1").partition(";")[0].strip().lower()
            if media_type != "application/json":
                return APIError(415, "The request body must be JSON, sent with 'Content-Type: application/json'.",
                                code="unsupported_media_type", headers=close)
            length = headers.get(b"content-length", b"")
            if length.isdigit() and int(length) > state.limits.max_body_bytes:
                return APIError(413, f"The request body is larger than {state.limits.max_body_bytes} bytes.",
                                code="body_too_large", headers=close)
        return None
