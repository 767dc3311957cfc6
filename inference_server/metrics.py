"""Prometheus text exposition (format 0.0.4) for the server's counters, with no extra dependency.

One `Metrics` object per app, made in `create_app` and passed to the engine: no module globals.
Everything is touched only from the event loop, so no locking is needed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence

# Seconds: from a tiny CPU model (tens of ms) up to SD-size GPU batches and long CPU queues.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Images per pipeline call: powers of two up to the largest batch anyone configures in practice.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.help = help_text
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for bound, count in zip(self.buckets, self.counts, strict=True):
            lines.append(f'{self.name}_bucket{{le="{_fmt(bound)}"}} {count}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.total}')
        lines.append(f"{self.name}_sum {_fmt(self.sum)}")
        lines.append(f"{self.name}_count {self.total}")
        return lines


class Counter:
    """A counter with one optional set of labels, e.g. errors by kind."""

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.labels = tuple(labels)
        self.values: defaultdict[tuple[str, ...], float] = defaultdict(float)

    def inc(self, *label_values: str, amount: float = 1.0) -> None:
        self.values[tuple(label_values)] += amount

    def get(self, *label_values: str) -> float:
        return self.values.get(tuple(label_values), 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        if not self.labels and not self.values:
            lines.append(f"{self.name} 0")
        for key, value in sorted(self.values.items()):
            lines.append(f"{self.name}{_labels(self.labels, key)} {_fmt(value)}")
        return lines


class Metrics:
    """The server's metrics. Gauges are read at scrape time from callables (e.g. the queue depth)."""

    def __init__(self) -> None:
        self.requests = Counter(
            "inference_requests_total",
            "Generation requests answered, by task and HTTP status.",
            ("task", "status"),
        )
        self.errors = Counter("inference_errors_total", "Failed requests by kind of error.", ("kind",))
        self.pipeline_calls = Counter("inference_pipeline_calls_total", "Pipeline calls made (batches run).")
        self.images = Counter("inference_images_total", "Images generated.")
        self.dropped = Counter(
            "inference_dropped_total", "Queued requests dropped before compute, by reason.", ("reason",)
        )
        self.batch_size = Histogram("inference_batch_size", "Images per pipeline call.", BATCH_BUCKETS)
        self.queue_wait = Histogram(
            "inference_queue_wait_seconds",
            "Time from admission to the start of the request's batch.",
            LATENCY_BUCKETS,
        )
        self.run_latency = Histogram(
            "inference_run_seconds", "Wall time of the pipeline call(s) that ran a request.", LATENCY_BUCKETS
        )
        self._gauges: list[tuple[str, str, Callable[[], float]]] = []

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self._gauges.append((name, help_text, read))

    def render(self) -> str:
        lines: list[str] = []
        for name, help_text, read in self._gauges:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {_fmt(read())}"]
        for metric in (
            self.requests,
            self.errors,
            self.pipeline_calls,
            self.images,
            self.dropped,
            self.batch_size,
            self.queue_wait,
            self.run_latency,
        ):
            lines += metric.render()
        return "\n".join(lines) + "\n"


def _fmt(value: float) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    escaped = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, escaped, strict=True)) + "}"
