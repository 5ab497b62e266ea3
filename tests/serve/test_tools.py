"""Tool calling through the official openai client on a random model: calls forced by tool_choice parse into
`tool_calls` whose arguments validate against the tool's schema, `tool` messages are accepted, and the
customer-service recipe's FAQ tool runs end to end."""

import json

import httpx
import jsonschema_rs
import openai
import pytest

from palmkit.apps.support import FAQ_TOOL, answer_with_tool, lookup_faq
from palmkit.model.checkpoint import save_checkpoint
from palmkit.serve.app import create_app
from palmkit.serve.grounding import FaqIndex
from palmkit.serve.protocol import ChatBody
from palmkit.serve.tools import parse_calls
from tests.conftest import random_model
from tests.serve.conftest import running

pytestmark = pytest.mark.timeout(300)

ORDER_TOOL = {"type": "function", "function": {
    "name": "lookup_order", "description": "Look up an order by its id.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["order_id"],
                   "properties": {"order_id": {"type": "string", "pattern": "^[0-9]{1,6}$"},
                                  "detail": {"enum": ["status", "items"]}}}}}
MESSAGES = [{"role": "user", "content": "Where is my order 1234?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer):
    """A random model with a context of 1024 tokens: the tools' JSON takes hundreds of the tiny tokenizer's."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(path, random_model(tokenizer.vocab_size, max_seq_len=1024), tokenizer)
    with running(create_app(path)) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def test_required_tool_choice_gives_calls_that_validate(client):
    schema = jsonschema_rs.validator_for(ORDER_TOOL["function"]["parameters"])
    for seed in range(10):
        out = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[ORDER_TOOL, FAQ_TOOL],
                                             tool_choice="required", temperature=1.0, seed=seed, max_tokens=120)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        arguments = json.loads(call.function.arguments)
        if call.function.name == "lookup_order":
            assert schema.is_valid(arguments), arguments
        else:
            assert call.function.name == "lookup_faq" and 1 <= len(arguments["query"]) <= 48


def test_a_named_tool_is_the_one_called_streamed_or_not(client):
    named = {"type": "function", "function": {"name": "lookup_order"}}
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[ORDER_TOOL, FAQ_TOOL],
                                          tool_choice=named, seed=3, max_tokens=120)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[ORDER_TOOL, FAQ_TOOL],
                                                 tool_choice=named, seed=3, max_tokens=120, stream=True))
    streamed = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or ()) if c.choices]
    assert [c.function.name for c in full.choices[0].message.tool_calls] == ["lookup_order"]
    assert [c.function.arguments for c in streamed] == [full.choices[0].message.tool_calls[0].function.arguments]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_auto_answers_text_or_a_valid_call_and_tool_messages_are_accepted(client):
    for seed in range(5):
        out = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[ORDER_TOOL], seed=seed,
                                             max_tokens=60)
        message = out.choices[0].message
        if message.tool_calls:
            assert json.loads(message.tool_calls[0].function.arguments)["order_id"].isdigit()
        elif (message.content or "").startswith("<"):  # the auto grammar: a call or text not starting with "<"
            assert out.choices[0].finish_reason == "length"  # a call cut short by max_tokens
    history = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "lookup_order", "arguments": '{"order_id":"1234"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "shipped"}'}]
    out = client.chat.completions.create(model="tiny", messages=history, tools=[ORDER_TOOL], tool_choice="none",
                                         max_tokens=8, temperature=0)
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason in ("stop", "length")


def test_assistant_calls_with_broken_arguments_are_400(server):
    history = [*MESSAGES, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "lookup_order", "arguments": "{not json"}}]}]
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": "tiny", "messages": history, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_parse_calls_reads_calls_of_known_tools_only():
    body = ChatBody.model_validate({"model": "m", "messages": MESSAGES, "tools": [ORDER_TOOL]})
    text = 'Sure. <tool_call>{"name":"lookup_order","arguments":{"order_id":"7"}}</tool_call>'
    content, [call] = parse_calls(text, body)
    assert content == "Sure." and json.loads(call["function"]["arguments"]) == {"order_id": "7"}
    assert parse_calls('<tool_call>{"name":"nope","arguments":{}}</tool_call>', body)[1] == []
    assert parse_calls("<tool_call>{broken</tool_call>", body) == ("<tool_call>{broken</tool_call>", [])


def test_support_recipe_faq_tool_through_the_openai_client(client, faq_file):
    index = FaqIndex.from_file(faq_file)
    text, call = answer_with_tool(client, "tiny", index, "How do I reset my password?", max_tokens=32)
    assert call["name"] == "lookup_faq" and 1 <= len(json.loads(call["arguments"])["query"]) <= 48
    assert isinstance(text, str)
    result = json.loads(lookup_faq(index, json.dumps({"query": "reset my password"})))
    assert result["question"] == "How do I reset my password?"
