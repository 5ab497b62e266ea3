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
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from palmkit.infer.engine import Event, Sink, events_of
from palmkit.infer.grammar import Constraint
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
from palmkit.serve.structured import request_constraint
from palmkit.serve.tools import chat_messages, parse_calls, rendered_tools, tool_constraint, tool_mode


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


def _logit_bias(body: SamplingBody, vocab: int) -> dict[int, float] | None:
    """logit_bias with its token ids as ints; an id that is not a number in [0, vocab) is a 400."""
    if not body.logit_bias:
        return None
    try:
        bias = {int(k): v for k, v in body.logit_bias.items()}
    except ValueError:
        bias = {-1: 0.0}
    if any(not 0 <= k < vocab for k in bias):
        raise APIError(400, f"logit_bias keys must be token ids in [0, {vocab}).", param="logit_bias",
                       code="invalid_value")
    return bias


def _controls(body: SamplingBody, vocab: int, constraint: Constraint | None) -> dict:
    """The per-request sampling controls of SamplingParams, with their "off" values where not sent."""
    return {"min_p": body.min_p or 0.0, "repetition_penalty": body.repetition_penalty or 1.0,
            "presence_penalty": body.presence_penalty or 0.0, "frequency_penalty": body.frequency_penalty or 0.0,
            "logit_bias": _logit_bias(body, vocab), "constraint": constraint}


def _choices(state: ServerState, body: SamplingBody, prompts: list[list[int]], budget: tuple[int | None, int | None],
             logprobs: int | None, echo: bool, constraint: Constraint | None) -> list[tuple[list[int], SamplingParams]]:
    """One (prompt, params) per choice: n choices per prompt, the i-th seeded with seed + i; budget: (max_tokens,
    the default when it is None)."""
    n = body.n or 1  # prompts x n and the stop strings are bounded by state.check_request
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    # top_p 0 is legal for OpenAI and means "the most likely token": the smallest positive mass keeps just it
    top_p = 1.0 if body.top_p is None else max(body.top_p, 1e-9)
    temperature = 1.0 if body.temperature is None else body.temperature
    controls = _controls(body, state.engine.vocab, constraint)
    out = []
    for prompt in prompts:
        tokens = _budget(state, prompt, *budget)
        for _ in range(n):
            seed = None if body.seed is None else (body.seed + len(out)) % 2**64
            out.append((prompt, SamplingParams(max_new_tokens=tokens, temperature=temperature, top_p=top_p,
                                               top_k=max(body.top_k or 0, 0), seed=seed, stop=stop,
                                               stop_at_eos=not body.ignore_eos, logprobs=logprobs,
                                               prompt_logprobs=logprobs if echo else None, **controls)))
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

    def __init__(self, chat: bool, model: str, extra: dict | None = None, tools: ChatBody | None = None):
        self.chat, self.model = chat, model
        self.tools = tools  # a chat request whose completions may hold tool calls (serve/tools.py)
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
            choices = [{"index": i, "message": self.message(t), "logprobs": lp, "finish_reason": self.finish(t, f)}
                       for i, (t, f, lp) in rows]
        else:
            choices = [{"index": i, "text": t, "logprobs": lp, "finish_reason": f} for i, (t, f, lp) in rows]
        return {**self._envelope(False), "choices": choices, "usage": usage, **self.extra}

    def message(self, text: str) -> dict:
        """A chat choice's message: its text, or the tool calls it holds."""
        content, calls = parse_calls(text, self.tools) if self.tools else (text, [])
        return {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}

    def finish(self, text: str, finish: str) -> str:
        return "tool_calls" if finish == "stop" and self.tools and parse_calls(text, self.tools)[1] else finish

    def tool_chunk(self, index: int, text: str, finish: str) -> list[dict]:
        """A tool-using choice's end, streamed: its text or its calls in one delta, then its finish reason."""
        message = self.message(text)
        delta = {"content": message["content"]} if "tool_calls" not in message else {"tool_calls": [
            {"index": k, **call} for k, call in enumerate(message["tool_calls"])]}
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
        return [{**self._envelope(True), "choices": [choice]}, self.chunk(index, finish=self.finish(text, finish))]

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


@dataclass
class _Plan:
    """A generation request, checked and encoded, before the model runs."""

    body: SamplingBody
    chat: bool
    prompts: list[list[int]]
    choices: list[tuple[list[int], SamplingParams]]
    stop_ids: list[int]
    requested: int | None  # alternatives per token; None: no log-probabilities
    echo: bool
    grounding: Grounding | None
    tools: ChatBody | None  # a chat request whose completions may hold tool calls


async def _chat_prompt(state: ServerState, body: ChatBody) -> tuple[list[int], list[int], Grounding | None]:
    """(prompt ids, stop ids, grounding) of a chat request; without an end-of-turn piece its marker is a stop string."""
    messages = chat_messages(body.messages, rendered_tools(body))
    grounding = await asyncio.to_thread(_ground, state, messages) if state.faq is not None else None
    end = state.tokenizer.sp.piece_to_id(END)
    has_end = end != state.tokenizer.sp.unk_id()
    prompt = await asyncio.to_thread(_chat_ids, state, grounding.messages if grounding else messages)
    if not has_end:  # a tokenizer without chat pieces can still write the marker as text
        body.stop = [*([body.stop] if isinstance(body.stop, str) else body.stop or []), END]
    return prompt, [end] if has_end else [], grounding


async def _plan(state: ServerState, request: Request, chat: bool) -> _Plan:
    body = await read_json(request, ChatBody if chat else CompletionBody, state.limits)
    state.check_model(body.model)
    state.check_request(body)  # by its counts alone; what remains is bounded, and runs on worker threads
    if not chat and state.faq is not None:  # a raw prompt has no user turn to ground: the FAQ would be bypassed
        raise APIError(400, "This server answers only from its FAQ (--faq): use /v1/chat/completions.",
                       param="prompt", code="faq_only")
    grounding, mode = None, tool_mode(body) if chat else None
    if chat:
        prompt, stop_ids, grounding = await _chat_prompt(state, body)
        prompts, budget = [prompt], (body.max_completion_tokens or body.max_tokens, None)
    else:
        prompts, stop_ids = await asyncio.to_thread(_prompt_ids, state, body.prompt), []
        budget = (body.max_tokens, DEFAULT_COMPLETION_TOKENS)
    tools = tool_constraint(body, mode) if mode else None
    constraint = await asyncio.to_thread(request_constraint, body, tools)
    requested, echo = _logprob_request(body, chat), not chat and body.echo
    choices = _choices(state, body, prompts, budget, requested, echo, constraint)
    if requested is not None:  # the response's size is known now, before the model runs
        check_logprob_values(sum(len(p) * echo + params.max_new_tokens for p, params in choices), requested + 1,
                             state.limits)
    return _Plan(body, chat, prompts, choices, stop_ids, requested, echo, grounding, body if mode else None)


async def _generate(request: Request, chat: bool) -> Response:
    state = server_state(request)
    plan = await _plan(state, request, chat)
    body, choices = plan.body, plan.choices
    logprobs = _Logprobs(state, body, chat, plan.requested, len(choices))
    # the echoed prompt of each choice, told apart from the completion until the choice's first event
    echo = plan.echo
    echoes = await asyncio.to_thread(lambda: [state.tokenizer.decode(p) if echo else None for p, _ in choices])
    prompt_tokens = sum(len(p) for p in plan.prompts)
    grounding = plan.grounding
    shape = _Shape(chat, state.model_name, {"faq": grounding.info()} if grounding else None, plan.tools)
    if grounding and not grounding.grounded:  # nothing to answer from: say so rather than let the model invent
        seqs, prompt_tokens = [], 0
        events = fixed_events(NO_ANSWER, len(choices))
    else:
        sink = Sink()
        if any(params.constraint for _, params in choices):  # building grammar matchers takes milliseconds
            seqs = await asyncio.to_thread(state.engine.submit, choices, sink, plan.stop_ids)
        else:
            seqs = state.engine.submit(choices, sink, plan.stop_ids)
        events = events_of(sink, len(seqs))
    output = _Output(shape, choices, logprobs, echoes, prompt_tokens)
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return EventStream(_stream(request, output, events, usage), cleanup=lambda: state.engine.cancel(seqs),
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    work, watch = asyncio.ensure_future(output.collect(request, events)), asyncio.ensure_future(
        _wait_disconnect(request))
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
        return JSONResponse(output.full([None] * len(choices)))
    return await asyncio.to_thread(output.respond)


class _Output:
    """What the choices of one request have produced so far, and the response it makes."""

    def __init__(self, shape: _Shape, choices: list[tuple[list[int], SamplingParams]], logprobs: _Logprobs,
                 echoes: list[str | None], prompt_tokens: int):
        n = len(choices)
        self.shape, self.choices, self.logprobs, self.echoes = shape, choices, logprobs, echoes
        self.prompt_tokens = prompt_tokens
        self.texts, self.finishes, self.tokens = [""] * n, ["length"] * n, [0] * n

    async def collect(self, request: Request, events: AsyncIterator[Event]) -> None:
        """Gather every choice's events (a full, non-streamed response)."""
        async for ev in events:
            if ev.error:
                raise generation_failed(request.scope, server_state(request).engine, ev.error)
            entries = []
            if self.echoes[ev.index] is not None:
                self.texts[ev.index] = self.echoes[ev.index]
                entries = prompt_entries(self.choices[ev.index][0], ev.prompt_logprobs)
                self.echoes[ev.index] = None
            self.texts[ev.index] += ev.text
            entries += _entries(ev)
            if len(entries) > 64:  # an echoed prompt: written out as JSON text off the event loop
                await asyncio.to_thread(self.logprobs.collect, ev.index, entries)
            else:
                self.logprobs.collect(ev.index, entries)
            self.finishes[ev.index] = ev.finish_reason or self.finishes[ev.index]
            self.tokens[ev.index] = ev.completion_tokens

    def usage(self) -> dict:
        return _usage(self.prompt_tokens, self.tokens)

    def full(self, logprobs: list) -> dict:
        return self.shape.full(self.texts, self.finishes, self.usage(), logprobs)

    def respond(self) -> Response:
        """The full response with log-probabilities: megabytes of JSON, joined from each choice's JSON text (on a
        worker thread)."""
        key = uuid.uuid4().hex  # a mark no text can hold: the echoed prompt is the client's
        marks = [f"\x00{key}.{i}\x00" for i in range(len(self.choices))]
        envelope = json.dumps(self.full(marks), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        pieces = re.split(rf'"\\u0000{key}\.(\d+)\\u0000"', envelope)
        body = "".join(self.logprobs.text(int(p)) if k % 2 else p for k, p in enumerate(pieces))
        return Response(body.encode(), media_type="application/json")

    async def echo_chunk(self, ev: Event, extra: dict) -> str:
        """A choice's echoed prompt, its first chunk (built off the event loop)."""
        def build() -> str:
            part = self.logprobs.part(ev.index, prompt_entries(self.choices[ev.index][0], ev.prompt_logprobs))
            return _sse({**self.shape.chunk(ev.index, self.echoes[ev.index], logprobs=part), **extra})

        text = await asyncio.to_thread(build)
        self.echoes[ev.index] = None
        return text

    def chunks(self, ev: Event, extra: dict) -> list[str]:
        """The chunks of one event; a tool-using choice's text is held back to its end (it may be a call)."""
        out, shape = [], self.shape
        self.texts[ev.index] += ev.text
        text = None if shape.tools else ev.text  # None: a delta with no content
        if text or ev.logprobs:
            part = self.logprobs.part(ev.index, _entries(ev))
            out.append(_sse({**shape.chunk(ev.index, text, logprobs=part), **extra}))
        if ev.finish_reason and shape.tools:
            out += [_sse({**c, **extra}) for c in shape.tool_chunk(ev.index, self.texts[ev.index], ev.finish_reason)]
        elif ev.finish_reason:
            out.append(_sse({**shape.chunk(ev.index, finish=ev.finish_reason), **extra}))
        return out


def _entries(ev: Event) -> list[Entry]:
    return [(lp.id, lp) for lp in ev.logprobs or ()]


async def _stream(request: Request, output: _Output, events: AsyncIterator[Event],
                  include_usage: bool) -> AsyncIterator[str]:
    request.scope["palmkit.status"] = 499  # until the last event has gone out
    shape = output.shape
    extra = {"usage": None} if include_usage else {}
    if shape.chat:
        for i in range(len(output.choices)):
            yield _sse({**shape.chunk(i, role=True), **extra})
    async for ev in events:
        if ev.error:
            yield _sse(generation_failed(request.scope, server_state(request).engine, ev.error).body())
            break
        output.tokens[ev.index] = ev.completion_tokens
        if output.echoes[ev.index] is not None:  # the choice's first event: its prompt goes first
            yield await output.echo_chunk(ev, extra)
        for chunk in output.chunks(ev, extra):
            yield chunk
    if include_usage:
        yield _sse(shape.usage_chunk(output.usage()))
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
