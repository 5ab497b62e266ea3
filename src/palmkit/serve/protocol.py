"""The OpenAI wire format: request bodies (pydantic), their cheap checks, and errors as OpenAI writes them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_BODY_BYTES = 1 << 20  # the default of serve.limits.Limits.max_body_bytes (--limits.max_body_bytes)


DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


MAX_LOGIT_BIAS = 300  # logit_bias entries per request, OpenAI's bound


MAX_PATTERN_CHARS, MAX_CHOICES = 4096, 256  # a guided_regex's characters, a guided_choice's strings


MAX_TOOLS = 64  # tools per chat request


MAX_LOGPROBS = 20  # alternatives per token: chat's limit at OpenAI (its legacy completions stop at 5)


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


class _Body(BaseModel):
    # strict: "5" is not a number and 5.0 is not an integer, as the OpenAI API answers
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    model_config = ConfigDict(populate_by_name=True)

    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    """`response_format`: text (no constraint), any JSON object, or JSON valid against `json_schema.schema`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingBody(_Body):
    model_config = ConfigDict(extra="allow")  # kept so that unknown parameters can be refused by name

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; 0 or -1: no cut
    n: int | None = Field(None, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says (benchmarks)
    return_tokens_as_token_ids: bool = False  # vLLM's extension: logprobs name tokens "token_id:ID"
    # the sampling controls of OpenAI (penalties, logit_bias) and vLLM (min_p, repetition_penalty); infer/sampling.py
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0, le=100, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = Field(
        None, max_length=MAX_LOGIT_BIAS)
    # structured output (infer/grammar.py): OpenAI's response_format, and vLLM's guided_* for a regex or a choice
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | None = None
    guided_regex: str | None = Field(None, max_length=MAX_PATTERN_CHARS)
    guided_choice: list[str] | None = Field(None, min_length=1, max_length=MAX_CHOICES)


class CompletionBody(SamplingBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    # 0 with echo scores the prompt alone (an evaluation harness's log-likelihood request)
    max_tokens: int | None = Field(None, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # the legacy form: how many alternatives
    echo: bool = False  # the prompt before the completion, in the text and the logprobs


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionDef(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(_Body):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers


class ChatBody(SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # this server makes at most one call per turn


# OpenAI parameters this server does not implement: refused unless they carry the value that means "off"
# (client libraries send some of them with that value).
UNSUPPORTED = {"suffix": (None, ""), "best_of": (None, 1), "functions": (None, []), "function_call": (None, "none"),
               "modalities": (None, ["text"])}

# OpenAI parameters that only tell OpenAI about the caller or its bookkeeping: accepted and ignored.
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"})


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
    # Anything else is refused by name: a parameter silently ignored would change results without a word.
    for name, value in (body.model_extra or {}).items():
        if name in UNSUPPORTED:
            if value not in UNSUPPORTED[name]:
                raise APIError(400, f"'{name}' is not supported by this server.", param=name,
                               code="unsupported_parameter")
        elif name not in IGNORED:
            raise APIError(400, f"Unrecognized request argument supplied: {name}", param=name,
                           code="unknown_parameter")
    return body


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refused with a 413 as soon as it passes `limit` bytes."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"The request body is larger than {limit} bytes.", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)
