"""The OpenAI wire format: bad requests get OpenAI's error bodies, oversized ones 413."""

import json

import httpx
import pytest

pytestmark = pytest.mark.timeout(120)


TOO_LONG = "a " * 400  # the tiny model's context is 256 tokens


@pytest.mark.parametrize("path,body,status,param,code", [
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model", "model_not_found"),
    ("/v1/completions", b"{not json", 400, None, None),
    ("/v1/completions", b"[1, 2]", 400, None, "invalid_body"),
    ("/v1/completions", {"model": "tiny"}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -1}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 10**30}, 400, "max_tokens",
     "context_length_exceeded"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "temperature": NaN}', 400, "temperature", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": 3}, 400, "temperature", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 1.5}, 400, "top_p", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 0}, 400, "n", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 100}, 400, "n", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": 5}, 400, "stop", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": []}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 99999]}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": TOO_LONG}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 21}, 400, "logprobs", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": True}, 400, "logprobs", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_k": -2}, 400, "top_k", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "min_p": 1.5}, 400, "min_p", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty",
     "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias.5",
     "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logit_bias": {"x": 1}}, 400, "logit_bias", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logit_bias": {"99999": 1}}, 400, "logit_bias",
     "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "response_format": {"type": "xml"}}, 400,
     "response_format.type", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "response_format": {"type": "json_schema"}}, 400,
     "response_format.json_schema", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "response_format": {
        "type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "frob"}}}}, 400, "response_format",
     "invalid_grammar"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "guided_regex": "("}, 400, "guided_regex", "invalid_grammar"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "guided_regex": "a", "guided_choice": ["a"]}, 400,
     "guided_choice", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "guided_choice": []}, 400, "guided_choice", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "guided_choice": ["a"], "ignore_eos": True}, 400,
     "ignore_eos", "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_logprobs": 2}, 400, "top_logprobs",
     "unknown_parameter"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "frequency_penalty": 2.5}, 400, "frequency_penalty",
     "invalid_value"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "suffix": "y"}, 400, "suffix", "unsupported_parameter"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "echo": True}, 400,
     "echo", "unknown_parameter"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     400, "top_logprobs", "invalid_value"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 21}, 400, "top_logprobs", "invalid_value"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
     400, "max_tokens", "invalid_value"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{}]},
     400, "tools", "invalid_value"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [
        {"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function",
                                                                          "function": {"name": "g"}}}, 400,
     "tool_choice", "invalid_value"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [
        {"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
        "response_format": {"type": "json_object"}}, 400, "tools", "invalid_value"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages", "invalid_value"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages.0.role", "invalid_value"),
    ("/v1/chat/completions", {"model": "tiny", "messages": "hello"}, 400, "messages", "invalid_value"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model",
     "model_not_found"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": TOO_LONG}]}, 400, "prompt",
     "context_length_exceeded"),
])
def test_bad_requests_get_openai_errors(server, path, body, status, param, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server + path, content=content, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    if code in ("unknown_parameter", "unsupported_parameter"):
        assert param in error["message"]


def test_oversized_body_is_refused_with_413(server):
    r = httpx.post(f"{server}/v1/completions", content=b'{"prompt": "' + b"a" * (9 << 20) + b'"}', timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
