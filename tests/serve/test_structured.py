"""Structured output, the sampling controls and tool calls through the official openai client, on a random model."""

import json
import re

import jsonschema_rs
import pytest

pytestmark = pytest.mark.timeout(600)

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "plan", "urgent"],
          "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0},
                         "plan": {"enum": ["free", "pro", "team"]}, "urgent": {"type": "boolean"}}}
FORMAT = {"type": "json_schema", "json_schema": {"name": "ticket", "schema": SCHEMA, "strict": True}}


def test_json_schema_holds_for_100_of_100_sampled_completions(client):
    """Done-when of structured output: every sampled completion of the random model validates (jsonschema_rs)."""
    validator = jsonschema_rs.validator_for(SCHEMA)
    valid = 0
    for batch in range(4):  # 4 requests of n=25: sampled choices decoded together in one batch
        out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "A ticket"}],
                                             response_format=FORMAT, n=25, temperature=1.0, seed=batch,
                                             max_tokens=200)
        for choice in out.choices:
            assert choice.finish_reason == "stop", choice.message.content
            valid += validator.is_valid(json.loads(choice.message.content))
    assert valid == 100


def test_json_object_streamed_equals_not_streamed(client):
    kwargs = {"model": "tiny", "prompt": "{", "max_tokens": 200, "temperature": 0.7, "seed": 5, "logit_bias": {},
              "extra_body": {"response_format": {"type": "json_object"}}}
    full = client.completions.create(**kwargs).choices[0]
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices)
    assert streamed == full.text
    if full.finish_reason == "stop":
        assert isinstance(json.loads(full.text), dict)


def test_regex_and_choice_through_extra_body(client):
    pattern = r"(ABC|XYZ)-[0-9]{2,4}"
    for seed in range(5):
        out = client.completions.create(model="tiny", prompt="Code:", max_tokens=20, seed=seed,
                                        extra_body={"guided_regex": pattern})
        assert re.fullmatch(pattern, out.choices[0].text), out.choices[0].text
        answer = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Refund?"}], seed=seed, max_tokens=10,
            extra_body={"guided_choice": ["yes", "no", "ask a human"]}).choices[0].message.content
        assert answer in ("yes", "no", "ask a human")


def test_a_constrained_request_leaves_others_in_its_batch_alone(client):
    """Greedy completions are the same with a constrained request decoded beside them."""
    alone = client.completions.create(model="tiny", prompt="Once upon", max_tokens=12, temperature=0).choices[0].text
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        constrained = pool.submit(client.completions.create, model="tiny", prompt="x", max_tokens=40, n=4, seed=1,
                                  extra_body={"response_format": FORMAT})
        beside = pool.submit(client.completions.create, model="tiny", prompt="Once upon", max_tokens=12,
                             temperature=0)
        assert beside.result().choices[0].text == alone
        assert all(json.loads(c.text) for c in constrained.result().choices if c.finish_reason == "stop")


def test_streamed_chat_json_schema_validates(client):
    validator = jsonschema_rs.validator_for(SCHEMA)
    for seed in range(3):
        chunks = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "A ticket"}],
                                                response_format=FORMAT, seed=seed, max_tokens=200, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert validator.is_valid(json.loads(text)), text
