"""An OpenAI-compatible HTTP server with streaming and continuous batching.

    palmkit serve --checkpoint DIR [--host 127.0.0.1] [--port 8000] [--api_key KEY] [--engine.max_batch N] [--faq FILE]

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream: true` as server-sent
events), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text format), and `GET /`: a web chat
page (palmkit/assets/chat.html) that streams greedy answers from /v1/chat/completions.

With `--faq FILE` (serve/grounding.py) every chat request is grounded: the FAQ entries that match the
last user message go into a system message right before it, and a question no entry matches gets
NO_ANSWER without running the model. Responses carry an extra `faq` field, `{"grounded", "sources"}`
(on the first chunk of a stream), which OpenAI clients ignore.

More endpoints (e.g. `/v1/classify`) plug in with `create_app(..., routers=[r])`: their routes get the API-key
check, the metrics and the error format, and reach the model through `request.app.state.palmkit`
(`ServerState`); `await state.engine.run(fn)` runs `fn()` on the engine thread between decode steps, so the
model is never used by two threads at once.

Hostile or unlucky clients (serve/limits.py, serve/guard.py, serve/connections.py): bodies are bounded (1 MiB
unless `--limits.max_body_bytes` says more) and parsed, tokenized and grounded off the event loop; the Host,
the key, the Content-Type and the size are checked before a body is read; headers, slow connections and the
number of connections are bounded. If the engine thread dies every model route answers 503 and the process
exits with status 1, for a supervisor (systemd `Restart=on-failure`, Kubernetes) to restart it; `/health`
answers 503 too, and also while the engine is wedged (work waiting, no step finished for
`--limits.wedge_seconds`).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from palmkit.infer.engine import Engine, EngineBusy, EngineOptions, EngineStopped, load_engine
from palmkit.infer.tensor_parallel import tensor_parallel_engine
from palmkit.model.chat_template import chat_template
from palmkit.serve.classify import classify_router
from palmkit.serve.connections import uvicorn_config
from palmkit.serve.embeddings import embeddings_router
from palmkit.serve.grounding import FaqIndex
from palmkit.serve.guard import LOOPBACK_NAMES, PUBLIC_PATHS, Guard, engine_stopped, request_id, server_error
from palmkit.serve.limits import Limits
from palmkit.serve.metrics import Metrics
from palmkit.serve.openai import api_router
from palmkit.serve.protocol import APIError
from palmkit.serve.recommend import recommend_router
from palmkit.serve.schema import error_responses, openapi_document
from palmkit.serve.state import ServerState
from palmkit.serve.tokenize import tokenize_router

log = logging.getLogger("palmkit.serve")


class _Instrument:
    """ASGI middleware: counts every request by route and status and times it to its last byte."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            # 499 (nginx's "client closed request") marks a stream the client left before its end.
            status = scope.get("palmkit.status", status)
            # The matched route's template, so that /v1/models/{model} is one label whatever the name
            endpoint = getattr(scope.get("route"), "path", None) or "other"
            self.state.metrics.observe(endpoint, status, time.perf_counter() - start)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(EngineBusy)
    async def engine_busy(request: Request, exc: EngineBusy) -> JSONResponse:
        return APIError(429, str(exc), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}).response()

    @app.exception_handler(EngineStopped)
    async def stopped(request: Request, exc: EngineStopped) -> JSONResponse:
        return engine_stopped().response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path")) or None
        return APIError(400, f"Invalid value for '{param}': {first['msg']}.", param=param,
                        code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), code=None,
                        headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # the traceback stays in the log, under the id the client is given
        log.exception("request %s: unhandled error on %s", request_id(request.scope), request.url.path)
        return server_error(request.scope).response()


async def _watch(engine: Engine, on_death: Callable[[], None] | None) -> None:
    """Wait for the engine thread to end while the app runs (it never should), then report it."""
    while engine.alive:
        await asyncio.sleep(0.2)
    log.critical("the engine thread has stopped: every model route answers 503")
    if on_death is not None:
        on_death()


@dataclass(frozen=True)
class AppOptions:
    """What `create_app` serves besides the model: its name, access, grounding and limits.

    Args:
        model_name: the model's name in the API (default: the checkpoint folder's name, or "palmkit")
        api_key: require `Authorization: Bearer KEY` on every route but the chat page and /health
        template: the chat template's name (default: the checkpoint's, else palmkit's)
        faq: a FAQ file (or index) that grounds chat requests
        limits: what clients may send (serve/limits.py)
        allowed_hosts: the only Host names answered (None: any)
        on_engine_death: called if the engine thread dies
        cors_origins: web origins whose pages may call the API ("*": any)
    """

    model_name: str | None = None
    api_key: str | None = None
    template: str | None = None
    faq: str | os.PathLike | FaqIndex | None = None
    limits: Limits = Limits()
    allowed_hosts: Iterable[str] | None = None
    on_engine_death: Callable[[], None] | None = None
    cors_origins: Sequence[str] = ()


def create_app(source: str | os.PathLike | Engine, options: EngineOptions = EngineOptions(),
               routers: Sequence[APIRouter] = (), app_options: AppOptions | None = None, **changes: Any) -> FastAPI:
    """The FastAPI app serving a checkpoint folder or an Engine (options: how a folder's engine runs); routers:
    more routes; `changes`: AppOptions fields that replace those of `app_options`
    (`create_app(ckpt, model_name="m", api_key="k")`)."""
    opts = replace(app_options or AppOptions(), **changes)
    faq = opts.faq
    faq_index = FaqIndex.from_file(faq) if faq is not None and not isinstance(faq, FaqIndex) else faq
    if isinstance(source, Engine):
        engine, config, default_name = source, {}, "palmkit"
    else:
        engine, config = load_engine(source, options)
        default_name = Path(source).resolve().name

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        watch = asyncio.create_task(_watch(engine, opts.on_engine_death))
        try:
            yield
        finally:
            watch.cancel()
            engine.stop()

    # With a key the interactive docs are off (a browser cannot send the key); /openapi.json needs the key.
    app = FastAPI(title="palmkit", lifespan=lifespan, docs_url=None if opts.api_key else "/docs", redoc_url=None)
    app.state.palmkit = state = ServerState(
        engine=engine, model_name=opts.model_name or default_name,
        format_chat=chat_template(opts.template or config.get("chat_template")), api_key=opts.api_key or None,
        metrics=Metrics(), created=int(time.time()), faq=faq_index, limits=opts.limits)
    engine.token_observers.append(state.metrics.observe_token)
    _install_error_handlers(app)
    if config.get("task") == "classify":
        routers = [*routers, classify_router(source, engine)]
    if config.get("task") == "recommend":
        routers = [*routers, recommend_router(source, engine)]
    for router in (api_router(), embeddings_router(), tokenize_router(), *routers):
        app.include_router(router, responses=error_responses())

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_document(app, state.model_name, state.api_key is not None, PUBLIC_PATHS)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    _add_own_routes(app, state)
    _add_middleware(app, state, opts)
    return app


def _add_own_routes(app: FastAPI, state: ServerState) -> None:
    """The chat page, /health and /metrics."""
    engine, limits = state.engine, state.limits
    page = chat_page_html(state)  # nothing in it changes while the app runs

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        """The web chat page."""
        return HTMLResponse(page)

    @app.get("/health", responses={503: {"description": "The engine has stopped or is wedged."}})
    async def health() -> JSONResponse:
        """200 while the engine runs: "ok", or "busy" while new work would get 429 (a load balancer may send it
        elsewhere; a liveness probe must not restart it); 503 when it has stopped, or is wedged (work waiting,
        no step finished for limits.wedge_seconds)."""
        busy = engine.queue_depth >= engine.max_queue or state.side.full
        status = ("engine stopped" if not engine.alive else
                  "engine wedged" if engine.wedged(limits.wedge_seconds) else "busy" if busy else "ok")
        return JSONResponse({"status": status}, status_code=200 if status in ("ok", "busy") else 503)

    @app.get("/metrics", responses={**error_responses(401), 200: {"content": {"text/plain": {}}}})
    async def metrics() -> Response:
        """Prometheus text exposition."""
        return Response(state.metrics.render(engine), media_type="text/plain; version=0.0.4; charset=utf-8")


def _add_middleware(app: FastAPI, state: ServerState, opts: AppOptions) -> None:
    cors_origins = list(opts.cors_origins)
    if "*" in cors_origins and opts.api_key is None:
        log.warning("--server.cors_origins '*' without an API key: every web page a visitor opens can use this "
                    "server through their browser; name the origins, or set --api_key")
    app.add_middleware(Guard, state=state, allowed_hosts=opts.allowed_hosts)
    if cors_origins:  # outside the guard: a browser's preflight carries no key, and its refusals need the headers
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], expose_headers=["X-Request-Id"])
    app.add_middleware(_Instrument, state=state)  # outermost: counts the guard's refusals too


def return_freed_memory() -> None:
    """Have glibc's malloc give freed memory back to the system (no-op elsewhere).

    By default glibc raises its mmap threshold each time a large block is freed, so that later blocks of that
    size (a step's logits and log-probabilities, a large response) come from its heap, whose free memory it keeps:
    the server's RSS then grows after every large request and stays there. A fixed threshold keeps large blocks
    mapped, unmapped when freed, and a fixed trim threshold returns the heap's free top (benchmarks/README.md,
    "bench_abuse.py")."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    mallopt(m_mmap_threshold, 64 << 10)
    mallopt(m_trim_threshold, 128 << 10)


def chat_page_html(state: ServerState) -> str:
    """assets/chat.html with what the page needs to know (model name, FAQ) in its JSON config element."""
    page = (resources.files("palmkit") / "assets" / "chat.html").read_text(encoding="utf-8")
    faq = state.faq and {"name": state.faq.name, "entries": len(state.faq.entries)}
    config = {"model": state.model_name, "faq": faq, "api_key_required": state.api_key is not None}
    # "<" escaped: a model or file name cannot close the <script> element that holds the JSON
    return page.replace("__PALMKIT_CONFIG__", json.dumps(config).replace("<", "\\u003c"))


@dataclass(frozen=True)
class ServerOptions:
    """How `palmkit serve` runs besides the model, its engine and its limits (`--server.FIELD`).

    Args:
        log_level: uvicorn's log level (critical, error, warning, info, debug)
        allowed_hosts: comma-separated Host names answered besides the loopback ones when bound to loopback
            (e.g. the name a local reverse proxy forwards); ignored on other addresses
        cors_origins: comma-separated web origins (`https://app.example.com`) whose pages may call the API
            from a browser, or `*` for any; none by default
        vocab_parallel: with --tp, split the shared embedding by vocabulary (false: keep it whole on every rank)
    """

    log_level: str = "info"
    allowed_hosts: str = ""
    cors_origins: str = ""
    vocab_parallel: bool = True


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          engine: EngineOptions = EngineOptions(), model_name: str | None = None, faq: str = "",
          limits: Limits = Limits(), tp: int = 1, server: ServerOptions = ServerOptions()) -> None:
    """Serve CHECKPOINT over an OpenAI-compatible HTTP API (completions, chat, streaming) with batching.

    The chat page is at http://HOST:PORT/.

    Args:
        checkpoint: a checkpoint folder (plain, int8 or low-rank)
        host: address to bind; loopback unless you mean to serve other machines (then set an API key)
        port: TCP port
        api_key: require `Authorization: Bearer KEY` on every route but the chat page and /health (/metrics and
            /openapi.json too; /docs is then off); the environment variable PALMKIT_API_KEY does the same without
            showing the key in `ps`
        engine: how the engine runs the model: --engine.dtype bfloat16, --engine.max_batch N (sequences decoded
            together; default 64, fewer if their KV cache would take over a quarter of the free memory),
            --engine.max_queue (requests waiting beyond those; more get 429), --engine.prefill_tokens (prompt
            tokens prefilled per step, default 128), --engine.device (README "Serve")
        model_name: the model's name in the API (default: the checkpoint folder's name)
        faq: a FAQ file (CSV question,answer or JSONL) that grounds chat answers; questions it does not cover
            get a fixed "no answer" reply
        limits: what one client may send and hold (body size, connections, timeouts; README "Serve")
        tp: tensor-parallel processes: `torchrun --nproc_per_node=N -m palmkit.cli serve --tp N ...`; rank 0
            serves, each rank takes the GPU of its local rank (or the CPU); --engine.device is then ignored
        server: --server.log_level, --server.allowed_hosts, --server.cors_origins, --server.vocab_parallel
    """
    api_key = api_key or os.environ.get("PALMKIT_API_KEY") or None
    loopback = host in LOOPBACK_NAMES
    hosts = [*LOOPBACK_NAMES, *(h.strip() for h in server.allowed_hosts.split(",") if h.strip())] if loopback else None
    uvicorn_server: uvicorn.Server | None = None
    died = False

    def exit_on_engine_death() -> None:
        nonlocal died
        died = True
        if uvicorn_server is not None:
            uvicorn_server.should_exit = True

    source, template = _serving_source(checkpoint, tp, engine, server.vocab_parallel)
    if source is None:  # a tensor-parallel follower: its leader's engine has stopped
        return
    app = create_app(source, engine, model_name=model_name or Path(checkpoint).resolve().name, api_key=api_key,
                     template=template, faq=faq or None, limits=limits, allowed_hosts=hosts,
                     on_engine_death=exit_on_engine_death,
                     cors_origins=[o.strip() for o in server.cors_origins.split(",") if o.strip()])
    if not loopback and api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    uvicorn_server = uvicorn.Server(uvicorn_config(app, limits, host=host, port=port, log_level=server.log_level))
    # What importing and loading made lives as long as the process: out of the cyclic collector's sight, a full
    # collection scans only what requests make (it scanned ~470k objects, a 0.6-1.1 s stall of every route on
    # 2 busy cores; benchmarks/README.md, "bench_abuse.py").
    gc.freeze()
    return_freed_memory()
    uvicorn_server.run()
    if died:  # status 1: a supervisor restarts a server whose engine is gone
        log.critical("exiting: the engine thread died")
        sys.exit(1)


def _serving_source(checkpoint: str, tp: int, engine: EngineOptions,
                    vocab_parallel: bool) -> tuple[str | Engine | None, str | None]:
    """(what create_app serves, its chat template): the folder, or with --tp rank 0's engine (None on the other
    ranks, which follow rank 0's forward passes until its engine stops)."""
    if tp <= 1:
        return checkpoint, None
    leader, config = tensor_parallel_engine(checkpoint, tp, engine, vocab_parallel)
    return leader, config.get("chat_template") if leader is not None else None
