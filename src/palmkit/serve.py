"""An OpenAI-compatible HTTP server with streaming and continuous batching.

    palmkit serve --checkpoint DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-batch 16] [--faq FILE]

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream: true` as server-sent
events), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text format), and `GET /`: a web chat
page (palmkit/assets/chat.html) that streams greedy answers from /v1/chat/completions.

With `--faq FILE` (issue 8, palmkit.support) every chat request is grounded: the FAQ entries that match the
last user message go into a system message right before it, and a question no entry matches gets
support.NO_ANSWER without running the model. Responses carry an extra `faq` field, `{"grounded", "sources"}`
(on the first chunk of a stream), which OpenAI clients ignore.

Continuous batching (Orca, Yu et al. 2022): one engine thread owns the model and a KV cache of `max_batch`
slots. Between decode steps it admits waiting requests, each prefilled alone (B=1) into a free slot; every
decode step then feeds the last token of all running sequences at their own positions (B=running, T=1).
Running sequences stay packed in slots 0..B-1: when one finishes, the last one's cache rows move into its
slot, so a step works on a view of the first rows and copies nothing. Measured on the `small` preset (CPU,
MKL, one thread, 200 cached positions; `benchmarks/bench_serve.py --layouts`), a step of 4 sequences in 16
slots took 51.7 ms on that view, 57.9 ms stepping all 16 slots with the idle ones ignored, and 52.0 ms
gathering the busy rows and scattering their new keys back; with 12 busy, 99.8, 61.6 and 104.7 ms, because
MKL multiplies 16 rows faster than 12. So the engine times each row count once at startup and pads the
packed view with free slots up to a faster count (`Engine.tune_step_rows`): the better of the first two.
A client that disconnects is cancelled at the next step boundary, which frees its slot.

Greedy requests give exactly the tokens of `palmkit.generate.generate`; each sampled request draws from its
own seeded generator, so a seeded request gives the same text whatever else runs.

More endpoints (e.g. `/v1/classify` from the fine-tuning module) plug in with `create_app(..., routers=[r])`:
their routes get the API-key check, the metrics and the error format, and reach the model through
`request.app.state.palmkit` (`ServerState`); `await state.engine.run(fn)` runs `fn()` on the engine thread
between decode steps, so the model is never used by two threads at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import json
import logging
import os
import re
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from palmkit.chat import END, chat_template
from palmkit.checkpoint import load_checkpoint
from palmkit.generate import SamplingParams, TextStream, make_generator, sample
from palmkit.model import KVCache, PaLM
from palmkit.support import NO_ANSWER, FaqIndex, Grounding, ground
from palmkit.tokenizer import Tokenizer

log = logging.getLogger("palmkit.serve")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_BODY_BYTES = 8 << 20  # prompts are bounded by the context; this bounds what a client can make us buffer
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


class APIError(Exception):
    """An error answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ----------------------------------------------------------------------------------------------------------
# Engine: one thread, one KV cache, continuous batching
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Event:
    """New output of one choice; `finish_reason` ("stop" or "length") or `error` is set on its last event."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None


class Sink:
    """Where a request's events go: an asyncio queue, filled from the engine thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self.loop = loop or asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()


@dataclass(eq=False)
class _Seq:
    index: int
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    sink: Sink
    stream: TextStream
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    written: int = 0  # cache positions filled; the next token is fed at this position
    finish: str | None = None
    cancelled: bool = False


class Engine:
    """Runs every request's generation on one thread, stepping all running sequences together."""

    def __init__(self, model: PaLM, tokenizer: Tokenizer, max_batch: int = 16, max_queue: int = 64,
                 autotune: bool = True):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"need max_batch >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model, self.tokenizer = model, tokenizer
        self.config = model.config
        weight = model.embed_tokens.weight
        self.device = weight.device
        self.cache = KVCache(model.config, max_batch, dtype=weight.dtype, device=weight.device)
        self.max_batch, self.max_queue = max_batch, max_queue
        # A model vocabulary padded past the tokenizer's must never produce an id the tokenizer cannot decode.
        self.vocab = min(tokenizer.vocab_size, model.config.vocab_size)
        self._pending: deque[_Seq] = deque()
        self._active: list[_Seq] = []  # _active[i] owns cache row i
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.prompt_tokens = self.completion_tokens = self.decode_steps = 0
        self.autotune = autotune
        self.step_rows = list(range(max_batch + 1))  # decode rows for b running sequences; see tune_step_rows

    # -- called from other threads ---------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._active)

    def start(self) -> Engine:
        """Start the engine thread (once)."""
        with self._cond:
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._loop, name="palmkit-engine", daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; unfinished requests get an error event."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, requests: Sequence[tuple[list[int], SamplingParams]], sink: Sink,
               stop_ids: Iterable[int] = ()) -> list[_Seq]:
        """Queue one sequence per (prompt ids, params); all or none: a full queue raises a 429 APIError."""
        extra = frozenset(stop_ids)
        seqs = [_Seq(i, list(prompt), p, extra | ({self.config.eos_id} if p.stop_at_eos else set()), sink,
                     TextStream(self.tokenizer, p.stop), make_generator(p.seed, self.device))
                for i, (prompt, p) in enumerate(requests)]
        with self._cond:
            if not self.alive or self._stopping:
                raise APIError(503, "The engine is not running.", "server_error", code="engine_stopped")
            free = self.max_batch - len(self._active)
            if len(self._pending) + len(seqs) > self.max_queue + free:
                raise APIError(429, f"The server is busy ({len(self._pending)} requests waiting); retry shortly.",
                               "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
            self._pending.extend(seqs)
            self._cond.notify()
        return seqs

    def cancel(self, seqs: Iterable[_Seq]) -> None:
        """Stop sequences early (client gone); their slots free up before the next decode step."""
        with self._cond:
            for seq in seqs:
                seq.cancelled = True
                if seq.finish is None and seq in self._pending:
                    self._pending.remove(seq)
            self._cond.notify()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn()` on the engine thread between steps (exclusive use of the model); a future of its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    async def run(self, fn: Callable[[], Any]) -> Any:
        """Await `fn()` run on the engine thread (for endpoints that need the model outside generation)."""
        return await asyncio.wrap_future(self.call(fn))

    # -- the engine thread -------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                if self.autotune:
                    try:
                        self.step_rows = self.tune_step_rows()
                        log.info("decode rows per running count: %s", self.step_rows[1:])
                    except Exception:  # e.g. out of memory at the largest batch: serve untuned
                        log.exception("could not time the decode step; stepping exactly the running rows")
                while self._step():
                    pass
        finally:
            with self._cond:
                self._stopping = True
                orphans = [*self._pending, *self._active]
                self._pending.clear()
                calls = list(self._calls)
                self._calls.clear()
            self._fail(orphans, "the engine stopped")
            for _, future in calls:
                future.cancel()
            self._active.clear()

    def _step(self) -> bool:
        with self._cond:
            while not (self._stopping or self._pending or self._active or self._calls):
                self._cond.wait()
            if self._stopping:
                return False
            calls = list(self._calls)
            self._calls.clear()
            admit = []
            while self._pending and len(self._active) + len(admit) < self.max_batch:
                admit.append(self._pending.popleft())
        for fn, future in calls:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as exc:
                    future.set_exception(exc)
        events: list[tuple[_Seq, Event]] = []
        # A failure fails the sequences it touched, never the server: one prompt's prefill, or one whole step.
        for seq in admit:
            if seq.cancelled:
                continue
            try:
                self._prefill(seq, events)
            except Exception as exc:
                log.exception("prefill failed")
                self._active.remove(seq)
                self._fail([seq], f"generation failed: {exc}")
        try:
            self._retire()
            if self._active:
                self._decode(events)
                self._retire()
        except Exception as exc:
            log.exception("decode step failed")
            failed, self._active = self._active, []
            self._deliver(events)
            self._fail(failed, f"generation failed: {exc}")
            return True
        self._deliver(events)
        return True

    def _prefill(self, seq: _Seq, events: list) -> None:
        slot = len(self._active)
        self._active.append(seq)
        ids = torch.tensor([seq.prompt], dtype=torch.long, device=self.device)
        positions = torch.arange(len(seq.prompt), device=self.device)[None]
        h = self.model.hidden_states(ids, positions, cache=self.cache.rows(slice(slot, slot + 1)))
        seq.written = len(seq.prompt)
        self.prompt_tokens += len(seq.prompt)
        self._sample([seq], self.model.logits(h[:, -1]), events)

    def _decode(self, events: list) -> None:
        running = self._active
        b, rows = len(running), self.step_rows[len(running)]
        # Rows past the running ones are free slots: they take a pad token at position 0, which the
        # next prefill of that slot overwrites, and attend only to themselves.
        last = torch.full((rows, 1), self.config.pad_id, dtype=torch.long)
        positions = torch.zeros((rows, 1), dtype=torch.long)
        last[:b, 0] = torch.tensor([s.tokens[-1] for s in running])
        positions[:b, 0] = torch.tensor([s.written for s in running])
        h = self.model.hidden_states(last.to(self.device), positions.to(self.device),
                                     cache=self.cache.rows(slice(0, rows)))
        logits = self.model.logits(h)[:b, -1]
        self.decode_steps += 1
        for s in running:
            s.written += 1
        self._sample(running, logits, events)

    @torch.inference_mode()
    def tune_step_rows(self, tolerance: float = 1.1) -> list[int]:
        """For each number of running sequences, how many cache rows a decode step should feed.

        Matrix-multiply libraries choose kernels by row count, and not monotonically: with MKL on one CPU
        thread the `small` preset stepped 16 rows in 53 ms but 12 rows in 80 ms and 7 rows in 55 ms.
        So each candidate count is timed once, and a step pads up to a larger count when that is more than
        `tolerance` times faster. It writes to cache rows: the engine runs it before it serves anything.
        """
        sizes = sorted({*range(1, min(16, self.max_batch) + 1), *range(8, self.max_batch + 1, 8), self.max_batch})
        times = {}
        for n in sizes:
            ids = torch.full((n, 1), self.config.pad_id, dtype=torch.long, device=self.device)
            zeros = torch.zeros((n, 1), dtype=torch.long, device=self.device)
            best = float("inf")
            for _ in range(3):  # the best of three: load from elsewhere only ever adds time
                t0 = time.perf_counter()
                self.model.logits(self.model.hidden_states(ids, zeros, cache=self.cache.rows(slice(0, n)))).sum().item()
                best = min(best, time.perf_counter() - t0)
            times[n] = best
        rows = [0]
        for b in range(1, self.max_batch + 1):
            own = min(n for n in sizes if n >= b)
            fastest = min((n for n in sizes if n >= b), key=times.__getitem__)
            rows.append(own if times[own] <= tolerance * times[fastest] else fastest)
        return rows

    def _sample(self, seqs: list[_Seq], logits: torch.Tensor, events: list) -> None:
        logits = logits[:, : self.vocab]
        greedy = logits.argmax(-1).tolist()  # one device sync for every greedy row
        for seq, row, best in zip(seqs, logits, greedy, strict=True):
            token = best if seq.params.temperature == 0 else sample(row, seq.params, seq.generator)
            self._accept(seq, token, events)

    def _accept(self, seq: _Seq, token: int, events: list) -> None:
        # The same stopping rules, in the same order, as generate.generate: stop ids, stop strings, length.
        seq.tokens.append(token)
        self.completion_tokens += 1
        if token in seq.stop_ids:
            seq.finish, text = "stop", seq.stream.finish()
        else:
            text = seq.stream.push(token)
            if seq.stream.stopped:
                seq.finish = "stop"
            elif len(seq.tokens) >= seq.params.max_new_tokens:
                seq.finish, text = "length", text + seq.stream.finish()
        if text or seq.finish:
            events.append((seq, Event(seq.index, text, seq.finish, len(seq.tokens))))

    def _retire(self) -> None:
        """Drop finished and cancelled sequences, moving the last running one into each freed slot."""
        i = 0
        while i < len(self._active):
            seq = self._active[i]
            if seq.finish is None and not seq.cancelled:
                i += 1
                continue
            last = self._active.pop()
            if last is not seq:
                src, n = len(self._active), last.written
                for k, v in zip(self.cache.k, self.cache.v, strict=True):
                    k[i, :, :n] = k[src, :, :n]
                    v[i, :, :n] = v[src, :, :n]
                self._active[i] = last

    def _fail(self, seqs: Iterable[_Seq], message: str) -> None:
        self._deliver([(s, Event(s.index, error=message, completion_tokens=len(s.tokens))) for s in seqs])

    @staticmethod
    def _deliver(events: list[tuple[_Seq, Event]]) -> None:
        # One wake-up of each event loop per step, not one per token.
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for seq, event in events:
            if not seq.cancelled:
                by_loop[seq.sink.loop].append((seq.sink.queue, event))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop is closed: nobody is waiting for these events
                pass


def _put_all(items: list[tuple[asyncio.Queue, Event]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)


async def events_of(sink: Sink, n: int) -> AsyncIterator[Event]:
    """The events of n sequences submitted with `sink`, until each has finished."""
    while n:
        event = await sink.queue.get()
        n -= event.finish_reason is not None or event.error is not None
        yield event


# ----------------------------------------------------------------------------------------------------------
# Metrics (Prometheus text format)
# ----------------------------------------------------------------------------------------------------------

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """Request counters and a latency histogram per endpoint; engine gauges are read when scraped."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, list[int]] = {}
        self.latency_sum: dict[str, float] = defaultdict(float)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests[endpoint, status] += 1
        counts = self.latency.setdefault(endpoint, [0] * (len(LATENCY_BUCKETS) + 1))
        for j, bound in enumerate((*LATENCY_BUCKETS, float("inf"))):
            counts[j] += seconds <= bound
        self.latency_sum[endpoint] += seconds

    def render(self, engine: Engine) -> str:
        """The exposition text."""
        out: list[str] = []

        def metric(name: str, kind: str, help: str, samples: Iterable[tuple[str, float]]) -> None:
            out.extend((f"# HELP {name} {help}", f"# TYPE {name} {kind}"))
            # ints stay exact (":g" would print a large counter as 1.23457e+06)
            out.extend(f"{name}{labels} {v if isinstance(v, int) else repr(float(v))}" for labels, v in samples)

        metric("palmkit_requests_total", "counter", "HTTP requests by endpoint and status code.",
               ((f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in sorted(self.requests.items())))
        metric("palmkit_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", engine.prompt_tokens)])
        metric("palmkit_completion_tokens_total", "counter", "Tokens generated.", [("", engine.completion_tokens)])
        metric("palmkit_decode_steps_total", "counter", "Batched decode steps (tokens/steps is the mean batch).",
               [("", engine.decode_steps)])
        metric("palmkit_queue_depth", "gauge", "Sequences waiting for a slot.", [("", engine.queue_depth)])
        metric("palmkit_running_sequences", "gauge", "Sequences holding a slot.", [("", engine.running)])
        metric("palmkit_max_batch", "gauge", "Slots in the KV cache.", [("", engine.max_batch)])
        bounds = [f"{b:g}" for b in LATENCY_BUCKETS] + ["+Inf"]
        hist = []
        for e, counts in sorted(self.latency.items()):
            hist += [(f'_bucket{{endpoint="{e}",le="{b}"}}', c) for b, c in zip(bounds, counts, strict=True)]
            hist += [(f'_sum{{endpoint="{e}"}}', self.latency_sum[e]), (f'_count{{endpoint="{e}"}}', counts[-1])]
        # Prometheus wants the suffixes on the name, so the histogram's "labels" here start with them.
        metric("palmkit_request_duration_seconds", "histogram", "Time from request to last byte.", hist)
        return "\n".join(out) + "\n"


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


# ----------------------------------------------------------------------------------------------------------
# Request bodies
# ----------------------------------------------------------------------------------------------------------


class _Body(BaseModel):
    # strict: "5" is not a number and 5.0 is not an integer, as the OpenAI API answers
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingBody(_Body):
    model_config = ConfigDict(extra="allow")  # kept so that UNSUPPORTED parameters can be refused by name

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    n: int | None = Field(None, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says (benchmarks)


class CompletionBody(_SamplingBody):
    prompt: str | list[str] | list[int] | list[list[int]]


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class ChatBody(_SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


# Parameters this server does not implement: refused unless they carry the value that means "off".
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
               "suffix": (None, ""), "best_of": (None, 1), "logit_bias": (None, {}),
               "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "tools": (None, []),
               "functions": (None, []), "response_format": (None, {"type": "text"})}


def parse_body(model: type[BaseModel], raw: bytes) -> Any:
    """Validate a JSON body; every mistake becomes a 400 naming the parameter, as OpenAI answers."""
    try:
        body = model.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        if first["type"] == "json_invalid":
            raise APIError(400, f"We could not parse the JSON body of your request: {first['msg']}") from None
        loc = [str(p) for p in first["loc"]]
        # A union reports one error per member (prompt.str, prompt.list[int]...): name the field only.
        param = loc[0] if len(errors) > 1 and all(e["loc"][:1] == first["loc"][:1] for e in errors) else ".".join(loc)
        msg = first["msg"] if len(errors) == 1 else f"{first['msg']} (and {len(errors) - 1} more errors)"
        raise APIError(400, f"Invalid value for '{param or 'body'}': {msg}.", param=param or None,
                       code="invalid_value" if param else "invalid_body") from None
    extra = body.model_extra or {}
    for name, off in UNSUPPORTED.items():
        if name in extra and extra[name] not in off:
            raise APIError(400, f"'{name}' is not supported by this server.", param=name, code="unsupported_parameter")
    return body


# ----------------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ServerState:
    """What the endpoints share; `request.app.state.palmkit` holds it."""

    engine: Engine
    model_name: str
    format_chat: Callable[..., str]
    api_key: str | None
    metrics: Metrics
    created: int
    faq: FaqIndex | None = None  # grounds chat requests (issue 8)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def context(self) -> int:
        return self.engine.config.max_seq_len

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")


def _state(request: Request) -> ServerState:
    return request.app.state.palmkit


def _check_key(request: Request) -> None:
    key = _state(request).api_key
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if not (scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


def _prompt_ids(state: ServerState, prompt: str | list) -> list[list[int]]:
    if isinstance(prompt, str):
        return [state.tokenizer.encode(prompt, bos=True)]
    if not prompt:
        raise APIError(400, "'prompt' must not be empty.", param="prompt", code="invalid_value")
    if isinstance(prompt[0], str):
        return [state.tokenizer.encode(p, bos=True) for p in prompt]
    prompts = [prompt] if isinstance(prompt[0], int) else prompt
    vocab = state.engine.vocab
    if any(not p or any(not 0 <= t < vocab for t in p) for p in prompts):
        raise APIError(400, f"Token prompts must be non-empty lists of ids in [0, {vocab}).", param="prompt",
                       code="invalid_value")
    return prompts


def _chat_messages(body: ChatBody) -> list[dict]:
    messages = []
    for m in body.messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or ())
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return messages


def _chat_ids(state: ServerState, messages: list[dict]) -> list[int]:
    return state.tokenizer.encode(state.format_chat(messages), bos=True)


def _ground(state: ServerState, messages: list[dict]) -> Grounding:
    try:
        return ground(state.faq, messages, fits=lambda m: len(_chat_ids(state, m)) < state.context)
    except ValueError as exc:
        raise APIError(400, f"{exc}.", param="messages", code="invalid_value") from None


async def fixed_events(text: str, n: int) -> AsyncIterator[Event]:
    """Events of n choices that all answer `text`, word by word; usage counts no tokens: no model ran."""
    words = re.findall(r"\S+\s*", text)
    for i in range(n):
        for j, word in enumerate(words):
            yield Event(i, word, "stop" if j == len(words) - 1 else None)


def _budget(state: ServerState, prompt: list[int], requested: int | None, default: int | None) -> int:
    """max_tokens for one prompt: a request past the context is refused, a default is cut to fit."""
    room = state.context - len(prompt)
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {state.context} tokens. However, your "
                       f"prompt is {len(prompt)} tokens.", param="prompt", code="context_length_exceeded")
    if requested is not None and requested > room:
        raise APIError(400, f"This model's maximum context length is {state.context} tokens. However, you "
                       f"requested {len(prompt) + requested} tokens ({len(prompt)} in the prompt, {requested} "
                       f"for the completion). Please reduce the prompt or max_tokens.", param="max_tokens",
                       code="context_length_exceeded")
    return requested if requested is not None else min(room, default or room)


def _choices(state: ServerState, body: _SamplingBody, prompts: list[list[int]], max_tokens: int | None,
             default: int | None) -> list[tuple[list[int], SamplingParams]]:
    """One (prompt, params) per choice: n choices per prompt, the i-th seeded with seed + i."""
    n = body.n or 1
    if n * len(prompts) > state.engine.max_batch:
        raise APIError(400, f"At most {state.engine.max_batch} choices (prompts x n) per request.", param="n",
                       code="invalid_value")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > 16:
        raise APIError(400, "At most 16 stop strings.", param="stop", code="invalid_value")
    # top_p 0 is legal for OpenAI and means "the most likely token": the smallest positive mass keeps just it
    top_p = 1.0 if body.top_p is None else max(body.top_p, 1e-9)
    temperature = 1.0 if body.temperature is None else body.temperature
    out = []
    for prompt in prompts:
        budget = _budget(state, prompt, max_tokens, default)
        for _ in range(n):
            seed = None if body.seed is None else (body.seed + len(out)) % 2**64
            out.append((prompt, SamplingParams(max_new_tokens=budget, temperature=temperature, top_p=top_p,
                                               seed=seed, stop=stop, stop_at_eos=not body.ignore_eos)))
    return out


class _Shape:
    """How the two endpoints spell their responses."""

    def __init__(self, chat: bool, model: str, extra: dict | None = None):
        self.chat, self.model = chat, model
        self.extra = extra or {}  # palmkit's own fields (`faq`): on the full response and a stream's first chunk
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def chunk(self, index: int, text: str | None = None, finish: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self._envelope(True), "choices": [choice], **(self.extra if role and index == 0 else {})}

    def full(self, texts: list[str], finishes: list[str], usage: dict) -> dict:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": f} for i, (t, f) in enumerate(zip(texts, finishes, strict=True))]
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                       for i, (t, f) in enumerate(zip(texts, finishes, strict=True))]
        return {**self._envelope(False), "choices": choices, "usage": usage, **self.extra}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._envelope(True), "choices": [], "usage": usage}


def _usage(prompt_tokens: int, completion: list[int]) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": sum(completion),
            "total_tokens": prompt_tokens + sum(completion)}


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events that run `cleanup` however they end (finished, client gone, error)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], cleanup: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self.cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.cleanup()  # first: a departed client's slots free up even if closing the generator fails
            await self.body_iterator.aclose()


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refused with a 413 as soon as it passes `limit` bytes."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"The request body is larger than {limit} bytes.", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _generate(request: Request, chat: bool) -> Response:
    state = _state(request)
    body = parse_body(ChatBody if chat else CompletionBody, await read_body(request))
    state.check_model(body.model)
    grounding = _ground(state, _chat_messages(body)) if chat and state.faq is not None else None
    if chat:
        end = state.tokenizer.sp.piece_to_id(END)
        has_end = end != state.tokenizer.sp.unk_id()
        messages = grounding.messages if grounding else _chat_messages(body)
        prompts, stop_ids = [_chat_ids(state, messages)], [end] if has_end else []
        if not has_end:  # a tokenizer without chat pieces can still write the marker as text
            body.stop = [*([body.stop] if isinstance(body.stop, str) else body.stop or []), END]
        max_tokens = body.max_completion_tokens or body.max_tokens
        default = None
    else:
        prompts, stop_ids = _prompt_ids(state, body.prompt), []
        max_tokens, default = body.max_tokens, DEFAULT_COMPLETION_TOKENS
    choices = _choices(state, body, prompts, max_tokens, default)
    prompt_tokens = sum(len(p) for p in prompts)
    shape = _Shape(chat, state.model_name, {"faq": grounding.info()} if grounding else None)
    if grounding and not grounding.grounded:  # nothing to answer from: say so rather than let the model invent
        seqs, prompt_tokens = [], 0
        events = fixed_events(NO_ANSWER, len(choices))
    else:
        sink = Sink()
        seqs = state.engine.submit(choices, sink, stop_ids)
        events = events_of(sink, len(seqs))
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return EventStream(_stream(request, shape, events, len(choices), prompt_tokens, usage),
                           cleanup=lambda: state.engine.cancel(seqs),
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    texts, finishes, tokens = [""] * len(choices), ["length"] * len(choices), [0] * len(choices)

    async def collect() -> None:
        async for ev in events:
            if ev.error:
                raise APIError(500, ev.error, "server_error")
            texts[ev.index] += ev.text
            finishes[ev.index] = ev.finish_reason or finishes[ev.index]
            tokens[ev.index] = ev.completion_tokens

    work, watch = asyncio.ensure_future(collect()), asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        state.engine.cancel(seqs)
        for task in (work, watch):
            task.cancel()
    if not work.done() or work.cancelled():
        return Response(status_code=499)  # the client left: nobody is there to read it
    work.result()
    return JSONResponse(shape.full(texts, finishes, _usage(prompt_tokens, tokens)))


async def _stream(request: Request, shape: _Shape, events: AsyncIterator[Event], n: int, prompt_tokens: int,
                  include_usage: bool) -> AsyncIterator[str]:
    request.scope["palmkit.status"] = 499  # until the last event has gone out
    tokens = [0] * n
    extra = {"usage": None} if include_usage else {}
    if shape.chat:
        for i in range(n):
            yield _sse({**shape.chunk(i, role=True), **extra})
    async for ev in events:
        if ev.error:
            yield _sse(APIError(500, ev.error, "server_error").body())
            break
        tokens[ev.index] = ev.completion_tokens
        if ev.text:
            yield _sse({**shape.chunk(ev.index, ev.text), **extra})
        if ev.finish_reason:
            yield _sse({**shape.chunk(ev.index, finish=ev.finish_reason), **extra})
    if include_usage:
        yield _sse(shape.usage_chunk(_usage(prompt_tokens, tokens)))
    yield _sse("[DONE]")
    request.scope["palmkit.status"] = 200


def _api_router() -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.post("/completions")
    async def completions(request: Request) -> Response:
        """Complete a prompt (OpenAI's legacy completions API)."""
        return await _generate(request, chat=False)

    @router.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        """Answer a conversation (OpenAI's chat completions API)."""
        return await _generate(request, chat=True)

    @router.get("/models")
    async def models(request: Request) -> dict:
        """The one model this server holds."""
        return {"object": "list", "data": [_model_card(_state(request))]}

    @router.get("/models/{model}")
    async def model(request: Request, model: str) -> dict:
        """One model by name."""
        _state(request).check_model(model)
        return _model_card(_state(request))

    return router


def _model_card(state: ServerState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "palmkit",
            "max_model_len": state.context}


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

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
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, "The server had an error while processing your request.", "server_error").response()


def load_engine(checkpoint: str | os.PathLike, device: str = "cpu", dtype: str = "float32", max_batch: int = 16,
                max_queue: int = 64) -> tuple[Engine, dict]:
    """(engine, config dict) for a checkpoint folder; the engine is not started yet."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model, tokenizer, config = load_checkpoint(checkpoint, device=device, dtype=DTYPES[dtype])
    return Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue), config


def create_app(source: str | os.PathLike | Engine, model_name: str | None = None, api_key: str | None = None,
               max_batch: int = 16, max_queue: int = 64, device: str = "cpu", dtype: str = "float32",
               template: str | None = None, routers: Sequence[APIRouter] = (),
               faq: str | os.PathLike | FaqIndex | None = None) -> FastAPI:
    """The FastAPI app serving a checkpoint folder or an Engine (max_batch, max_queue, device: folder only);
    faq: a FAQ file (or index) that grounds chat requests."""
    faq_index = FaqIndex.from_file(faq) if faq is not None and not isinstance(faq, FaqIndex) else faq
    if isinstance(source, Engine):
        engine, config, default_name = source, {}, "palmkit"
    else:
        engine, config = load_engine(source, device, dtype, max_batch, max_queue)
        default_name = Path(source).resolve().name

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="palmkit", lifespan=lifespan)
    app.state.palmkit = state = ServerState(
        engine=engine, model_name=model_name or default_name,
        format_chat=chat_template(template or config.get("chat_template")), api_key=api_key or None,
        metrics=Metrics(), created=int(time.time()), faq=faq_index)
    _install_error_handlers(app)
    app.include_router(_api_router(), dependencies=[Depends(_check_key)])
    if config.get("task") == "classify":
        routers = [*routers, classify_router(source, engine)]
    for router in routers:
        app.include_router(router, dependencies=[Depends(_check_key)])

    page = chat_page_html(state)  # nothing in it changes while the app runs

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        """The web chat page."""
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while the engine runs, 503 when it has stopped."""
        ok = engine.alive
        return JSONResponse({"status": "ok" if ok else "engine stopped"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text exposition."""
        return Response(state.metrics.render(engine), media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(_Instrument, state=state)
    return app


def chat_page_html(state: ServerState) -> str:
    """assets/chat.html with what the page needs to know (model name, FAQ) in its JSON config element."""
    from importlib import resources

    page = (resources.files("palmkit") / "assets" / "chat.html").read_text(encoding="utf-8")
    faq = state.faq and {"name": state.faq.name, "entries": len(state.faq.entries)}
    config = {"model": state.model_name, "faq": faq, "api_key_required": state.api_key is not None}
    # "<" escaped: a model or file name cannot close the <script> element that holds the JSON
    return page.replace("__PALMKIT_CONFIG__", json.dumps(config).replace("<", "\\u003c"))


class ClassifyRequest(BaseModel):
    """POST /v1/classify: one text or a list of them."""

    model: str
    input: str | list[str]


def classify_router(checkpoint: str | os.PathLike, engine: Engine) -> APIRouter:
    """`POST /v1/classify` for a `palmkit finetune classify` checkpoint: labels and their probabilities."""
    from palmkit.finetune import load_classifier

    classifier = load_classifier(checkpoint, model=engine.model, tokenizer=engine.tokenizer)
    router = APIRouter()

    @router.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: Request) -> JSONResponse:
        state = _state(request)
        state.check_model(body.model)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or len(texts) > 256:
            raise APIError(400, "input must hold 1 to 256 texts", param="input")
        results = await state.engine.run(lambda: classifier.predict(texts))
        return JSONResponse({"object": "list", "model": state.model_name, "labels": classifier.labels,
                             "data": [{"index": i, "label": label, "probabilities": probs}
                                      for i, (label, probs) in enumerate(results)]})

    return router


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 16, max_queue: int = 64, model_name: str | None = None, device: str = "cpu",
          dtype: Literal["float32", "bfloat16", "float16"] = "float32", log_level: str = "info",
          faq: str = "") -> None:
    """Serve CHECKPOINT over an OpenAI-compatible HTTP API (completions, chat, streaming) with batching.

    --api-key (or env PALMKIT_API_KEY, which `ps` does not show) requires `Authorization: Bearer KEY` on /v1/*.
    --max-batch sequences run together; --max-queue more wait, and beyond that requests get 429.
    Binds to loopback unless --host says otherwise. The chat page is at http://HOST:PORT/.
    --faq FILE (CSV question,answer or JSONL) grounds chat answers in the FAQ; questions it does not cover get
    a fixed "no answer" reply (palmkit.support).
    """
    import uvicorn

    api_key = api_key or os.environ.get("PALMKIT_API_KEY") or None
    app = create_app(checkpoint, model_name=model_name, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                     device=device, dtype=dtype, faq=faq or None)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
