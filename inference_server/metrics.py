"""The server's Prometheus metrics, in a `CollectorRegistry` of their own.

One `Metrics` object per app, made in `create_app` and passed to the engine: no module globals and
not prometheus_client's global registry, so several apps in one process (the tests run many) keep
separate counts. Counters and histograms are only touched from the event loop; gauges are read at
scrape time from callables (the queue depth, the running batch).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

# Seconds: from a tiny CPU model (tens of ms) up to SD-size GPU batches and long CPU queues.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Seconds to load a model: a tiny test model (tens of ms) up to a FLUX checkpoint from a slow disk.
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# Images per pipeline call: powers of two up to the largest batch anyone configures in practice.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """The server's counters and histograms; `gauge()` adds one read from a callable at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "inference_requests_total",
            "Generation requests answered, by task and HTTP status.",
            ("task", "status"),
            registry=registry,
        )
        self.errors = Counter(
            "inference_errors_total", "Failed requests by kind of error.", ("kind",), registry=registry
        )
        self.pipeline_calls = Counter(
            "inference_pipeline_calls_total", "Pipeline calls made (batches run).", registry=registry
        )
        self.images = Counter("inference_images_total", "Images generated.", registry=registry)
        self.dropped = Counter(
            "inference_dropped_total",
            "Queued requests dropped before compute, by reason.",
            ("reason",),
            registry=registry,
        )
        self.batch_size = Histogram(
            "inference_batch_size", "Images per pipeline call.", buckets=BATCH_BUCKETS, registry=registry
        )
        self.queue_wait = Histogram(
            "inference_queue_wait_seconds",
            "Time from admission to the start of the request's batch.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.run_latency = Histogram(
            "inference_run_seconds",
            "Wall time of the pipeline call(s) that ran a request.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

        self.model_load_seconds = Histogram(
            "inference_model_load_seconds",
            "Time to load (and warm up) a model, by registry name.",
            ("model",),
            buckets=LOAD_BUCKETS,
            registry=registry,
        )
        self.model_load_failures = Counter(
            "inference_model_load_failures_total",
            "Model loads that failed, by model.",
            ("model",),
            registry=registry,
        )
        self.model_evictions = Counter(
            "inference_model_evictions_total",
            "Models unloaded to stay within [registry] memory_budget_mb, by model.",
            ("model",),
            registry=registry,
        )

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        Gauge(name, help_text, registry=self.registry).set_function(read)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """(body, Content-Type) for a scrape: the text format, or OpenMetrics when `accept` asks for it."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type
