"""Prometheus metrics of the server (text exposition format) and the middleware that records them."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from palmkit.infer.engine import Engine

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# vLLM's buckets for its time to first token and inter-token latency, so that dashboards made for it fit
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)


class Histogram:
    """Cumulative bucket counts and the sum of observed values (a Prometheus histogram)."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.bounds = (*buckets, float("inf"))
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for j, bound in enumerate(self.bounds):
            self.counts[j] += value <= bound
        self.sum += value

    def samples(self, labels: str = "") -> list[tuple[str, float]]:
        """The `_bucket`, `_sum` and `_count` samples; `labels` like 'endpoint="/x"'."""
        sep = "," if labels else ""
        les = [f"{b:g}" if b != float("inf") else "+Inf" for b in self.bounds]
        return [*((f'_bucket{{{labels}{sep}le="{le}"}}', c) for le, c in zip(les, self.counts, strict=True)),
                (f"_sum{{{labels}}}" if labels else "_sum", self.sum),
                (f"_count{{{labels}}}" if labels else "_count", self.counts[-1])]


class Metrics:
    """Request counters and a latency histogram per endpoint, the engine's time to first token and inter-token
    latency (observed on the engine thread, `observe_token`); engine gauges are read when scraped."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.first_token = Histogram(TTFT_BUCKETS)
        self.inter_token = Histogram(ITL_BUCKETS)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests[endpoint, status] += 1
        self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def observe_token(self, first: bool, seconds: float) -> None:
        """A sequence's token: its first `seconds` after it was submitted, or a later one after the previous."""
        (self.first_token if first else self.inter_token).observe(seconds)

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
        # Prometheus wants the suffixes on the name, so the histogram's "labels" here start with them.
        metric("palmkit_request_duration_seconds", "histogram", "Time from request to last byte.",
               [x for e, h in sorted(self.latency.items()) for x in h.samples(f'endpoint="{e}"')])
        metric("palmkit_time_to_first_token_seconds", "histogram",
               "Time from a sequence's submission to its first generated token.", self.first_token.samples())
        metric("palmkit_inter_token_latency_seconds", "histogram",
               "Time between consecutive generated tokens of a sequence.", self.inter_token.samples())
        return "\n".join(out) + "\n"
