"""Prometheus metrics of the server (text exposition format) and the middleware that records them."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from palmkit.infer.engine import Engine

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """Request counters and a latency histogram per endpoint; engine gauges are read when scraped."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, list[int]] = {}
        self.latency_sum: dict[str, float] = defaultdict(float)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests[endpoint, status] += 1
        counts = self.latency.setdefault(endpoint, [0] * (len(LATENCY_BUCKETS) + 1))
        for j, bound in enumerate((*LATENCY_BUCKETS, float("inf"))):
            counts[j] += seconds <= bound
        self.latency_sum[endpoint] += seconds

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
        bounds = [f"{b:g}" for b in LATENCY_BUCKETS] + ["+Inf"]
        hist = []
        for e, counts in sorted(self.latency.items()):
            hist += [(f'_bucket{{endpoint="{e}",le="{b}"}}', c) for b, c in zip(bounds, counts, strict=True)]
            hist += [(f'_sum{{endpoint="{e}"}}', self.latency_sum[e]), (f'_count{{endpoint="{e}"}}', counts[-1])]
        # Prometheus wants the suffixes on the name, so the histogram's "labels" here start with them.
        metric("palmkit_request_duration_seconds", "histogram", "Time from request to last byte.", hist)
        return "\n".join(out) + "\n"
