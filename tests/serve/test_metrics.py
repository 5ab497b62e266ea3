"""The server's Prometheus metrics: requests, tokens, latency, time to first token and inter-token latency."""

import re

import httpx
import pytest

from palmkit.serve.metrics import Histogram
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


def test_time_to_first_token_and_inter_token_latency_histograms(server, client):
    before = {n: metric(server, n) for n in ("palmkit_time_to_first_token_seconds_count",
                                              "palmkit_inter_token_latency_seconds_count",
                                              "palmkit_time_to_first_token_seconds_sum")}
    client.completions.create(model="tiny", prompt="x", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    text = httpx.get(f"{server}/metrics").text
    # one sequence: one first token, then 4 gaps between its 5 tokens
    assert metric(server, "palmkit_time_to_first_token_seconds_count") == before[
        "palmkit_time_to_first_token_seconds_count"] + 1
    assert metric(server, "palmkit_inter_token_latency_seconds_count") == before[
        "palmkit_inter_token_latency_seconds_count"] + 4
    assert metric(server, "palmkit_time_to_first_token_seconds_sum") > before["palmkit_time_to_first_token_seconds_sum"]
    assert "# TYPE palmkit_time_to_first_token_seconds histogram" in text
    assert "# TYPE palmkit_inter_token_latency_seconds histogram" in text
    buckets = [float(v) for v in re.findall(r'^palmkit_inter_token_latency_seconds_bucket\{le="[^"]+"\} (\S+)$',
                                            text, re.M)]
    assert buckets == sorted(buckets) and buckets[-1] == metric(server, "palmkit_inter_token_latency_seconds_count")


def test_histogram_counts_values_at_or_below_each_bound():
    values = [0.003, 0.01, 0.011, 0.5, 7.0, 1e6]
    hist = Histogram((0.01, 0.5, 10.0))
    for v in values:
        hist.observe(v)
    samples = dict(hist.samples('endpoint="/x"'))
    # the independent reference: count the values <= each bound directly
    for bound, le in ((0.01, "0.01"), (0.5, "0.5"), (10.0, "10"), (float("inf"), "+Inf")):
        assert samples[f'_bucket{{endpoint="/x",le="{le}"}}'] == sum(v <= bound for v in values)
    assert samples['_count{endpoint="/x"}'] == len(values)
    assert samples['_sum{endpoint="/x"}'] == pytest.approx(sum(values))
    assert dict(Histogram((1.0,)).samples())['_bucket{le="+Inf"}'] == 0
