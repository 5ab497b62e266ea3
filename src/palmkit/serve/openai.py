"""The OpenAI routes: `/v1/completions`, `/v1/chat/completions` (streamed as server-sent events), `/v1/models`.

Log-probabilities (serve/logprobs.py) are the model's own, before temperature, top-k and top-p. They cover every
generated token except a final stop token (EOS, end of turn), which the text does not show either; a stop string
cuts the text, not the tokens that wrote it. While streaming, a chunk carries the log-probabilities of the tokens
accepted since the previous chunk, so a chunk's text (held back while it could still start a stop string or end
inside a character) need not be exactly those tokens' text; all chunks together give the full response's lists.
`echo` puts the prompt before the completion (first in a stream), and with `logprobs` its log-probabilities;
`max_tokens: 0` with `echo` scores the prompt alone, as evaluation harnesses ask.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from palmkit.infer.engine import Event, Sink, events_of
from palmkit.infer.sampling import SamplingParams
from palmkit.model.chat_template import END, encode_chat
from palmkit.serve.grounding import NO_ANSWER, Grounding, ground
from palmkit.serve.guard import generation_failed
from palmkit.serve.limits import check_logprob_values, read_json
from palmkit.serve.logprobs import Entry, JsonLists, LegacyLogprobs, TokenNames, chat_logprobs, prompt_entries
from palmkit.serve.protocol import (
    DEFAULT_COMPLETION_TOKENS,
    APIError,
    ChatBody,
    CompletionBody,
    SamplingBody,
)
from palmkit.serve.schema import json_body
from palmkit.serve.state import ServerState, server_state


def _prompt_ids(state: ServerState, prompt: str | list) -> list[list[int]]:
    if isinstance(prompt, str):
        return [state.tokenizer.encode_prompt(prompt)]
    if not prompt:
        raise APIError(400, "'prompt' must not be empty.", param="prompt", code="invalid_value")
    if isinstance(prompt[0], str):
        return [state.tokenizer.encode_prompt(p) for p in prompt]
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
    return encode_chat(state.tokenizer, messages, template=state.format_chat)


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
    if room < (requested != 0):  # scoring a prompt (max_tokens 0) may fill the whole context
        raise APIError(400, f"This model's maximum context length is {state.context} tokens. However, your "
                       f"prompt is {len(prompt)} tokens.", param="prompt", code="context_length_exceeded")
    if requested is not None and requested > room:
        raise APIError(400, f"This model's maximum context length is {state.context} tokens. However, you "
                       f"requested {len(prompt) + requested} tokens ({len(prompt)} in the prompt, {requested} "
                       f"for the completion). Please reduce the prompt or max_tokens.", param="max_tokens",
                       code="context_length_exceeded")
    return requested if requested is not None else min(room, default or room)


def _choices(state: ServerState, body: SamplingBody, prompts: list[list[int]], max_tokens: int | None,
             default: int | None, logprobs: int | None, echo: bool) -> list[tuple[list[int], SamplingParams]]:
    """One (prompt, params) per choice: n choices per prompt, the i-th seeded with seed + i."""
    n = body.n or 1  # prompts x n and the stop strings are bounded by state.check_request
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    # top_p 0 is legal for OpenAI and means "the most likely token": the smallest positive mass keeps just it
    top_p = 1.0 if body.top_p is None else max(body.top_p, 1e-9)
    temperature = 1.0 if body.temperature is None else body.temperature
    out = []
    for prompt in prompts:
        budget = _budget(state, prompt, max_tokens, default)
        for _ in range(n):
            seed = None if body.seed is None else (body.seed + len(out)) % 2**64
            out.append((prompt, SamplingParams(max_new_tokens=budget, temperature=temperature, top_p=top_p,
                                               top_k=max(body.top_k or 0, 0), seed=seed, stop=stop,
                                               stop_at_eos=not body.ignore_eos, logprobs=logprobs,
                                               prompt_logprobs=logprobs if echo else None)))
    return out


def _logprob_request(body: SamplingBody, chat: bool) -> int | None:
    """How many alternatives per token the request asks for; None: no log-probabilities."""
    if not chat:
        return body.logprobs
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs",
                       code="invalid_value")
    return (body.top_logprobs or 0) if body.logprobs else None


class _Logprobs:
    """Each choice's log-probabilities in its endpoint's shape, chunk by chunk (None: not requested)."""

    def __init__(self, state: ServerState, body: SamplingBody, chat: bool, requested: int | None, n: int):
        self.chat, self.on = chat, requested is not None
        self.names = TokenNames(state.tokenizer, body.return_tokens_as_token_ids)
        self.legacy = [LegacyLogprobs(self.names) for _ in range(n)]
        keys = ("content",) if chat else ("tokens", "token_logprobs", "top_logprobs", "text_offset")
        self.lists = [JsonLists(keys, ',"refusal":null' if chat else "") for _ in range(n)]

    def part(self, index: int, entries: list[Entry]) -> dict | None:
        if not self.on:
            return None
        return chat_logprobs(self.names, entries) if self.chat else self.legacy[index].add(entries)

    def collect(self, index: int, entries: list[Entry]) -> None:
        """Add entries to a full response's lists, as JSON text (JsonLists)."""
        if self.on and entries:
            self.lists[index].add(self.part(index, entries))

    def text(self, index: int) -> str:
        return self.lists[index].text() if self.on else "null"


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

    def chunk(self, index: int, text: str | None = None, finish: str | None = None, role: bool = False,
              logprobs: dict | None = None) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        return {**self._envelope(True), "choices": [choice], **(self.extra if role and index == 0 else {})}

    def full(self, texts: list[str], finishes: list[str], usage: dict, logprobs: list[dict | None]) -> dict:
        rows = enumerate(zip(texts, finishes, logprobs, strict=True))
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": lp,
                        "finish_reason": f} for i, (t, f, lp) in rows]
        else:
            choices = [{"index": i, "text": t, "logprobs": lp, "finish_reason": f} for i, (t, f, lp) in rows]
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


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _generate(request: Request, chat: bool) -> Response:
    state = server_state(request)
    body = await read_json(request, ChatBody if chat else CompletionBody, state.limits)
    state.check_model(body.model)
    state.check_request(body)  # by its counts alone; what remains is bounded, and runs on worker threads
    if not chat and state.faq is not None:  # a raw prompt has no user turn to ground: the FAQ would be bypassed
        raise APIError(400, "This server answers only from its FAQ (--faq): use /v1/chat/completions.",
                       param="prompt", code="faq_only")
    grounded = chat and state.faq is not None
    grounding = await asyncio.to_thread(_ground, state, _chat_messages(body)) if grounded else None
    if chat:
        end = state.tokenizer.sp.piece_to_id(END)
        has_end = end != state.tokenizer.sp.unk_id()
        messages = grounding.messages if grounding else _chat_messages(body)
        prompts, stop_ids = [await asyncio.to_thread(_chat_ids, state, messages)], [end] if has_end else []
        if not has_end:  # a tokenizer without chat pieces can still write the marker as text
            body.stop = [*([body.stop] if isinstance(body.stop, str) else body.stop or []), END]
        max_tokens = body.max_completion_tokens or body.max_tokens
        default = None
    else:
        prompts, stop_ids = await asyncio.to_thread(_prompt_ids, state, body.prompt), []
        max_tokens, default = body.max_tokens, DEFAULT_COMPLETION_TOKENS
    requested, echo = _logprob_request(body, chat), not chat and body.echo
    choices = _choices(state, body, prompts, max_tokens, default, requested, echo)
    if requested is not None:  # the response's size is known now, before the model runs
        check_logprob_values(sum(len(p) * echo + params.max_new_tokens for p, params in choices), requested + 1,
                             state.limits)
    logprobs = _Logprobs(state, body, chat, requested, len(choices))
    # the echoed prompt of each choice, told apart from the completion until the choice's first event
    echoes = await asyncio.to_thread(lambda: [state.tokenizer.decode(p) if echo else None for p, _ in choices])
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
        return EventStream(_stream(request, shape, events, choices, prompt_tokens, usage, logprobs, echoes),
                           cleanup=lambda: state.engine.cancel(seqs),
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    texts, finishes, tokens = [""] * len(choices), ["length"] * len(choices), [0] * len(choices)

    async def collect() -> None:
        async for ev in events:
            if ev.error:
                raise generation_failed(request.scope, state.engine, ev.error)
            entries = []
            if echoes[ev.index] is not None:
                texts[ev.index] = echoes[ev.index]
                entries = prompt_entries(choices[ev.index][0], ev.prompt_logprobs)
                echoes[ev.index] = None
            texts[ev.index] += ev.text
            entries += _entries(ev)
            if len(entries) > 64:  # an echoed prompt: written out as JSON text off the event loop
                await asyncio.to_thread(logprobs.collect, ev.index, entries)
            else:
                logprobs.collect(ev.index, entries)
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

    if not logprobs.on:
        return JSONResponse(shape.full(texts, finishes, _usage(prompt_tokens, tokens), [None] * len(choices)))

    def respond() -> Response:  # megabytes of JSON: joined off the event loop from each choice's JSON text
        key = uuid.uuid4().hex  # a mark no text can hold: the echoed prompt is the client's
        marks = [f"\x00{key}.{i}\x00" for i in range(len(choices))]
        envelope = json.dumps(shape.full(texts, finishes, _usage(prompt_tokens, tokens), marks),
                              ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        pieces = re.split(rf'"\\u0000{key}\.(\d+)\\u0000"', envelope)
        body = "".join(logprobs.text(int(p)) if k % 2 else p for k, p in enumerate(pieces))
        return Response(body.encode(), media_type="application/json")

    return await asyncio.to_thread(respond)


def _entries(ev: Event) -> list[Entry]:
    return [(lp.id, lp) for lp in ev.logprobs or ()]


async def _stream(request: Request, shape: _Shape, events: AsyncIterator[Event],
                  choices: list[tuple[list[int], SamplingParams]], prompt_tokens: int, include_usage: bool,
                  logprobs: _Logprobs, echoes: list[str | None]) -> AsyncIterator[str]:
    request.scope["palmkit.status"] = 499  # until the last event has gone out
    n = len(choices)
    tokens = [0] * n
    extra = {"usage": None} if include_usage else {}
    if shape.chat:
        for i in range(n):
            yield _sse({**shape.chunk(i, role=True), **extra})
    async for ev in events:
        if ev.error:
            yield _sse(generation_failed(request.scope, server_state(request).engine, ev.error).body())
            break
        tokens[ev.index] = ev.completion_tokens
        if echoes[ev.index] is not None:  # the choice's first event: its prompt goes first, built off the loop
            def echo_chunk(ev: Event = ev) -> str:
                part = logprobs.part(ev.index, prompt_entries(choices[ev.index][0], ev.prompt_logprobs))
                return _sse({**shape.chunk(ev.index, echoes[ev.index], logprobs=part), **extra})

            yield await asyncio.to_thread(echo_chunk)
            echoes[ev.index] = None
        if ev.text or ev.logprobs:
            part = logprobs.part(ev.index, _entries(ev))
            yield _sse({**shape.chunk(ev.index, ev.text, logprobs=part), **extra})
        if ev.finish_reason:
            yield _sse({**shape.chunk(ev.index, finish=ev.finish_reason), **extra})
    if include_usage:
        yield _sse(shape.usage_chunk(_usage(prompt_tokens, tokens)))
    yield _sse("[DONE]")
    request.scope["palmkit.status"] = 200


def api_router() -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.post("/completions", openapi_extra=json_body(
        CompletionBody, {"prompt": "Once upon a time", "max_tokens": 8}, stream=True))
    async def completions(request: Request) -> Response:
        """Complete a prompt (OpenAI's legacy completions API)."""
        return await _generate(request, chat=False)

    @router.post("/chat/completions", openapi_extra=json_body(
        ChatBody, {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8}, stream=True))
    async def chat_completions(request: Request) -> Response:
        """Answer a conversation (OpenAI's chat completions API)."""
        return await _generate(request, chat=True)

    @router.get("/models")
    async def models(request: Request) -> dict:
        """The one model this server holds."""
        return {"object": "list", "data": [_model_card(server_state(request))]}

    @router.get("/models/{model}")
    async def model(request: Request, model: str) -> dict:
        """One model by name."""
        server_state(request).check_model(model)
        return _model_card(server_state(request))

    return router


def _model_card(state: ServerState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "palmkit",
            "max_model_len": state.context}
