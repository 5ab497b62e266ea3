"""The OpenAPI document: it describes each route's real body and errors, checked by schemathesis against a server."""

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from palmkit.infer.engine import EngineOptions
from palmkit.serve.app import create_app
from palmkit.serve.schema import ERRORS
from tests.serve.conftest import running

pytestmark = pytest.mark.timeout(300)

KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def keyed(checkpoint):
    """The tiny model served with an API key and two slots (so that `n` and prompt lists hit the bounds)."""
    with running(create_app(checkpoint, model_name="tiny", api_key=KEY, options=EngineOptions(max_batch=2))) as base:
        yield base


def test_document_holds_the_bodies_and_errors(keyed):
    assert httpx.get(f"{keyed}/openapi.json").status_code == 401
    doc = httpx.get(f"{keyed}/openapi.json", headers=AUTH).json()
    assert doc["openapi"] == "3.2.0"  # the version whose itemSchema describes one event of a stream
    for path, field in (("/v1/completions", "prompt"), ("/v1/chat/completions", "messages")):
        operation = doc["paths"][path]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert field in body["required"] and "max_tokens" in body["properties"]
        assert {str(s) for s in ERRORS} <= set(operation["responses"])  # 400, 401, 404, 408, 413, 415, 429, 503
        assert "422" not in operation["responses"]  # this server answers 400 for a bad body, as OpenAI does
        assert set(operation["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
        events = operation["responses"]["200"]["content"]["text/event-stream"]
        assert events["itemSchema"]["properties"]["data"]["type"] == "string" and "schema" not in events
        assert operation["security"] == [{"bearer": []}]
    assert doc["paths"]["/health"]["get"]["security"] == []
    for path, field in (("/v1/embeddings", "input"), ("/tokenize", "prompt"), ("/detokenize", "tokens")):
        operation = doc["paths"][path]["post"]
        assert field in operation["requestBody"]["content"]["application/json"]["schema"]["properties"]
        assert {str(s) for s in ERRORS} <= set(operation["responses"]) and operation["security"] == [{"bearer": []}]
    error = doc["components"]["schemas"]["ErrorBody"]
    assert error["properties"]["error"] == {"$ref": "#/components/schemas/ErrorDetail"}


CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance", "response_schema_conformance",
          "negative_data_rejection", "unsupported_method")


def test_every_response_is_documented_and_none_is_a_server_error(keyed):
    """schemathesis runs every phase against the served tiny model: the spec's examples, its coverage cases (each
    bound and each documented response, streamed events checked against `itemSchema`), a bounded fuzz of every
    route (valid and invalid bodies, headers, paths, methods) and stateful sequences."""
    run = subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "run", f"{keyed}/openapi.json",
         "--header", f"Authorization: Bearer {KEY}", "--phases", "examples,coverage,fuzzing,stateful",
         "--max-examples", "15",
         "--seed", "0", "--checks", ",".join(CHECKS), "--request-timeout", "60"],
        capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-6000:]
    summary = run.stdout[run.stdout.index("SUMMARY"):]
    # the 7 routes of completions, chat, models, model, health, metrics and the page, and /v1/embeddings,
    # /tokenize, /detokenize
    assert "Tested: 10" in summary and "passed" in summary, summary
