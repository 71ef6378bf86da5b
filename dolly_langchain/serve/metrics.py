"""The server's Prometheus metrics (``GET /metrics``), one registry per app so that tests can run several apps.

Names follow vLLM's (``vllm:num_requests_running`` ...) in Prometheus' own style, under ``dolly_``:

- ``dolly_requests_running``: requests generating now (rows of the engine's current batches, minus cancelled ones);
- ``dolly_requests_waiting``: requests admitted and not yet generating (queued for the next batch);
- ``dolly_requests_total{status}``: finished requests by outcome: ``ok``, ``rejected`` (429, queue full),
  ``client_error`` (4xx), ``timeout``, ``cancelled`` (the client went away), ``error`` (5xx);
- ``dolly_generated_tokens_total``, ``dolly_prompt_tokens_total``;
- histograms ``dolly_time_to_first_token_seconds`` (streamed requests) and ``dolly_request_seconds``.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics"]

# Seconds; CPU answers take seconds to minutes, GPU ones milliseconds to seconds.
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)


class ServerMetrics:
    def __init__(self, running: Callable[[], int], waiting: Callable[[], int]):
        self.registry = CollectorRegistry()
        gauge_running = Gauge("dolly_requests_running", "Requests generating now", registry=self.registry)
        gauge_running.set_function(running)
        gauge_waiting = Gauge("dolly_requests_waiting", "Requests admitted and waiting for a batch",
                              registry=self.registry)
        gauge_waiting.set_function(waiting)
        self.requests = Counter("dolly_requests", "Finished requests by outcome", ["status"], registry=self.registry)
        self.generated_tokens = Counter("dolly_generated_tokens", "Tokens generated", registry=self.registry)
        self.prompt_tokens = Counter("dolly_prompt_tokens", "Prompt tokens read", registry=self.registry)
        self.time_to_first_token = Histogram("dolly_time_to_first_token_seconds",
                                             "Seconds from a streamed request's arrival to its first token",
                                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.request_seconds = Histogram("dolly_request_seconds", "Seconds from a request's arrival to its end",
                                         buckets=_LATENCY_BUCKETS, registry=self.registry)
        for status in ("ok", "rejected", "client_error", "timeout", "cancelled", "error"):
            self.requests.labels(status)  # every outcome shows from the start, at 0

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def usage(self, usage: dict | None) -> None:
        if usage:
            self.prompt_tokens.inc(usage.get("input_tokens", 0))
            self.generated_tokens.inc(usage.get("output_tokens", 0))
