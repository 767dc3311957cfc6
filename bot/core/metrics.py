"""The bot's Prometheus metrics, in a registry of its own per core (several cores in one test process
never share counters; the inference server does the same per app).

`instrument(service, backend, metrics)` is called once, where the core is built (`bot.bootstrap`):
it times the submission entry points, wraps each chat platform's delivery as it is registered, and
counts the backend's errors by server. The gauges of jobs by state and of the queue are read from the
database when scraped (`BotMetrics.render`), so they are the fleet's numbers, the same from every
process; counters and histograms are this process's.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sqlalchemy import func, select

from bot.backends.base import (
    BackendError,
    EventCallback,
    GeneratedImage,
    GenerationParams,
    InferenceBackend,
    ModelCapabilities,
    ModelInfo,
    ServerFleet,
)
from bot.core.api import CoreError, Delivery, JobView, ResultImage, ServiceError
from bot.core.db import Database
from bot.core.models import Job

log = logging.getLogger("bot.core.metrics")

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
# What a user waits for: an accepted submission is a few database round trips (milliseconds); a job
# from submission to its result is seconds on a GPU, minutes on a CPU or behind a long queue.
SUBMIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
JOB_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
# The entry points that create jobs (bot.core.api.ImageService); each is timed under its own name.
SUBMISSIONS = ("imagine", "inpaint", "react", "reroll", "variation", "image_to_image", "upscale", "zoom_out",
               "pan", "remix")  # fmt: skip

T = TypeVar("T")


class BotMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Gauge("imagine_bot_jobs", "Jobs in the database by state (all bot processes)", ["state"],
                          registry=r)  # fmt: skip
        self.queue_depth = Gauge(
            "imagine_bot_queue_depth", "Jobs waiting to be run (queued, all bot processes)", registry=r
        )
        self.submit_seconds = Histogram(
            "imagine_bot_submit_seconds",
            "Time to accept or refuse a submission (validation, quota, the job row), by operation",
            ["operation", "outcome"],
            buckets=SUBMIT_BUCKETS,
            registry=r,
        )
        self.job_seconds = Histogram(
            "imagine_bot_job_seconds",
            "From submission to the result or failure handed to the chat platform, by platform and outcome",
            ["platform", "outcome"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.jobs_finished = Counter(
            "imagine_bot_jobs_finished_total",
            "Jobs whose outcome this process handed to a chat platform",
            ["platform", "outcome"],
            registry=r,
        )
        self.delivery_failures = Counter(
            "imagine_bot_delivery_failures_total",
            "Callbacks into a chat platform's delivery that raised (the job stays undelivered or is "
            "retried), by platform and callback",
            ["platform", "callback"],
            registry=r,
        )
        self.backend_errors = Counter(
            "imagine_bot_backend_errors_total",
            "Failed attempts at the image backend, by server (an inference server's URL, or the "
            "backend's name) and kind",
            ["server", "kind"],
            registry=r,
        )

    def backend_error(self, server: str, kind: str) -> None:
        self.backend_errors.labels(server=server, kind=kind).inc()

    async def refresh(self, db: Database) -> None:
        """Read the job gauges from the database (one grouped count over the jobs' state index)."""
        async with db.read() as s:
            rows = (await s.execute(select(Job.state, func.count()).group_by(Job.state))).all()
        counts = {state: 0 for state in JOB_STATES}
        counts.update({str(state): int(n) for state, n in rows})
        for state, n in counts.items():
            self.jobs.labels(state=state).set(n)
        self.queue_depth.set(counts["queued"])

    async def render(self, db: Database) -> bytes:
        """The exposition text, the job gauges fresh (their last values if the database is down:
        the scrape still shows the counters, and readiness says the database is gone)."""
        try:
            await self.refresh(db)
        except Exception as e:  # noqa: BLE001 - any database trouble; the gauges keep their values
            log.warning("metrics: job counts not refreshed: %s", e)
        return generate_latest(self.registry)

    def timed(self, operation: str, fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        # Looked up once: `labels` on every submission cost more than the observation.
        observe = {
            outcome: self.submit_seconds.labels(operation=operation, outcome=outcome).observe
            for outcome in ("accepted", "refused", "error")
        }

        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> T:
            start = time.perf_counter()
            outcome = "error"
            try:
                result = await fn(*args, **kwargs)
                outcome = "accepted"
                return result
            except ServiceError:
                raise  # the database or the storage failed: "error"
            except CoreError:
                outcome = "refused"  # bad input, quota, moderation, overload: an answer, not a fault
                raise
            finally:
                observe[outcome](time.perf_counter() - start)

        return wrapper


class MeteredDelivery:
    """A platform's `Delivery` that counts outcomes, end-to-end times and failing callbacks."""

    def __init__(self, platform: str, inner: Delivery, metrics: BotMetrics, clock: Callable[[], Any]):
        self.platform = platform
        self.inner = inner
        self.metrics = metrics
        self.clock = clock

    async def _call(self, callback: str, call: Awaitable[None]) -> None:
        try:
            await call
        except Exception:
            self.metrics.delivery_failures.labels(platform=self.platform, callback=callback).inc()
            raise

    def _finished(self, job: JobView, outcome: str) -> None:
        self.metrics.jobs_finished.labels(platform=self.platform, outcome=outcome).inc()
        waited = (self.clock() - job.created_at).total_seconds()
        self.metrics.job_seconds.labels(platform=self.platform, outcome=outcome).observe(max(0.0, waited))

    async def on_queued(self, job: JobView, position: int) -> None:
        await self._call("on_queued", self.inner.on_queued(job, position))

    async def on_progress(self, job: JobView, step: int, total: int) -> None:
        await self._call("on_progress", self.inner.on_progress(job, step, total))

    async def on_waiting(self, job: JobView, message: str) -> None:
        await self._call("on_waiting", self.inner.on_waiting(job, message))

    async def on_preview(self, job: JobView, step: int, total: int, png: bytes) -> None:
        # Only called when `inner` implements it (the dispatcher looks through `.inner`).
        await self._call("on_preview", self.inner.on_preview(job, step, total, png))  # type: ignore[attr-defined]

    async def on_succeeded(self, job: JobView, images: Sequence[ResultImage]) -> None:
        await self._call("on_succeeded", self.inner.on_succeeded(job, images))
        self._finished(job, "succeeded")

    async def on_failed(self, job: JobView, message: str) -> None:
        await self._call("on_failed", self.inner.on_failed(job, message))
        self._finished(job, job.state if job.state in ("failed", "cancelled") else "failed")


class MeteredBackend:
    """A backend that reports no servers of its own (Hugging Face, the fake): its errors are counted
    under its name. Only the dispatcher and the model watch use it; `Core.backend` stays the
    backend itself."""

    def __init__(self, inner: InferenceBackend, metrics: BotMetrics):
        self.inner = inner
        self.name = inner.name
        self.metrics = metrics

    async def capabilities(self) -> ModelCapabilities | None:
        return await self.inner.capabilities()

    async def models(self) -> list[ModelInfo] | None:
        return await self.inner.models()

    def capacity(self) -> int | None:
        return self.inner.capacity()

    async def generate(
        self, params: GenerationParams, on_event: EventCallback | None = None
    ) -> list[GeneratedImage]:
        try:
            return await self.inner.generate(params, on_event)
        except BackendError as e:
            self.metrics.backend_error(self.name, type(e).__name__)
            raise

    async def close(self) -> None:
        await self.inner.close()


def instrument(service: Any, backend: InferenceBackend, metrics: BotMetrics) -> InferenceBackend:
    """Wire `metrics` into a `CoreService` and its backend; returns the backend the dispatcher should
    use. The service's entry points are its parts' methods assigned at construction
    (bot.core.service), so wrapping them here leaves the parts unaware of metrics."""
    for name in SUBMISSIONS:
        setattr(service, name, metrics.timed(name, getattr(service, name)))
    register = service.register_delivery

    def register_delivery(platform: str, delivery: Delivery) -> None:
        register(platform, delivery)  # checks the callbacks first
        service.deliveries[platform] = MeteredDelivery(platform, delivery, metrics, service.clock)

    service.register_delivery = register_delivery
    if isinstance(backend, ServerFleet):
        backend.observe_server_errors(metrics.backend_error)
        return backend
    return MeteredBackend(backend, metrics)
