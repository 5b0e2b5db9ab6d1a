"""Prometheus metrics of the server (``GET /metrics``), kept by ``prometheus_client``.

One registry per app, so two apps in one process (tests) do not share counters.
"""

from __future__ import annotations

from ..validation import missing_extra

try:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
except ModuleNotFoundError as err:  # the optional [server] extra
    raise missing_extra("prometheus_client", "server") from err

#: Request latencies span a 20 ms health check to minutes for a 64k-token prompt on a CPU.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600)


class ServerMetrics:
    """Queue depth, running batch size, generated tokens, request latency and time to first token."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("selfextend_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("selfextend_running_requests", "Requests in the running batches", registry=r)
        self.tokens = Counter("selfextend_generated_tokens", "Tokens generated (rate() gives tokens/s)", registry=r)
        self.requests = Counter("selfextend_requests", "Finished HTTP requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram(
            "selfextend_request_seconds", "Time from request to full response", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.first_token = Histogram(
            "selfextend_time_to_first_token_seconds", "Time from request to the first streamed piece",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip

    def on_step(self, queue_depth: int, running: int, new_tokens: int) -> None:
        """The batcher's per-step callback."""
        self.queue_depth.set(queue_depth)
        self.running.set(running)
        if new_tokens:
            self.tokens.inc(new_tokens)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
