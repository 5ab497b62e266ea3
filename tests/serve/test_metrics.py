"""The server's Prometheus metrics: requests, tokens and latency."""

import re

import httpx
import pytest

from tests.serve.conftest import metric

pytestmark = pytest.mark.timeout(120)


def test_metrics_count_requests_tokens_and_latency(server, client):
    before = metric(server, "palmkit_completion_tokens_total")
    client.completions.create(model="tiny", prompt="x", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    httpx.post(f"{server}/v1/completions", content=b"{", headers={"Content-Type": "application/json"})
    text = httpx.get(f"{server}/metrics").text
    assert metric(server, "palmkit_completion_tokens_total") == before + 5
    assert re.search(r'^palmkit_requests_total\{endpoint="/v1/completions",status="200"\} [1-9]', text, re.M)
    assert re.search(r'^palmkit_requests_total\{endpoint="/v1/completions",status="400"\} [1-9]', text, re.M)
    assert re.search(r'^palmkit_request_duration_seconds_bucket\{endpoint="/v1/completions",le="\+Inf"\} [1-9]',
                     text, re.M)
    assert "# TYPE palmkit_request_duration_seconds histogram" in text
    assert metric(server, "palmkit_queue_depth") == 0 and metric(server, "palmkit_running_sequences") == 0
