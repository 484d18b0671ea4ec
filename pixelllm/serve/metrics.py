"""The server's Prometheus metrics, in a registry of its own (``GET /metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Requests by task and status, their latency, the queue's depth, and the batches' sizes and times
    (the rate of ``pixelllm_batch_seconds_sum`` is the share of time the model is busy).

    The ``task`` label takes only the names of known tasks (others count as "unknown"), so that
    clients cannot grow the label set.
    """

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("pixelllm_requests", "Task requests answered, by task and HTTP status",
                                ["task", "status"], registry=self.registry)
        self.latency = Histogram("pixelllm_request_seconds", "Time from a task request's arrival to its answer",
                                 ["task"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("pixelllm_queue_depth", "Requests admitted and not yet answered (waiting or running)",
                                 registry=self.registry)
        self.batch_size = Histogram("pixelllm_batch_size", "Requests run together in one batch, by task",
                                    ["task"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_seconds = Histogram("pixelllm_batch_seconds", "Time the model took for one batch, by task",
                                       ["task"], buckets=LATENCY_BUCKETS, registry=self.registry)

    def observe_request(self, task: str, status: int, seconds: float) -> None:
        self.requests.labels(task, str(status)).inc()
        self.latency.labels(task).observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)
