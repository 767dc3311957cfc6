"""Dynamic batching: one asyncio task owns the queue and feeds the pipeline runner.

Requests that share a batch key (task, size, steps, guidance, strength, scheduler) are grouped into
one pipeline call, oldest first, up to `max_batch_size` images and `max_batch_pixels` pixels. The
oldest request waits at most `max_wait_ms` for company while the device is idle; while a batch
runs, new requests simply queue, so under load batches fill without waiting at all. Requests whose
submitter gave up (deadline, client gone) are dropped before they cost compute. Only this task
talks to the runner, so the device sees one call at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque

from inference_server.config import BatchingConfig
from inference_server.engine import (
    DeadlineExceeded,
    EngineError,
    EventCallback,
    GenerationRequest,
    GenerationResult,
    Job,
    Preview,
    Progress,
    Queued,
    Started,
)
from inference_server.engine_base import EngineBase
from inference_server.metrics import Metrics
from inference_server.pipelines import PipelineRunner, RequestPreviews

log = logging.getLogger(__name__)

# Arrival gaps remembered: enough to see a burst of a typical batch, short enough to adapt within
# a few requests when traffic changes.
ARRIVAL_HISTORY = 8
# Fewer gaps than this say nothing yet: wait for company, the safe default for throughput.
MIN_ARRIVAL_HISTORY = 4


class DynamicBatchingEngine(EngineBase):
    """The default `Engine`: dynamic request-level batching over a `PipelineRunner`."""

    name = "dynamic"

    def __init__(self, runner: PipelineRunner, config: BatchingConfig, metrics: Metrics) -> None:
        super().__init__(runner, config, metrics)
        self._queue: deque[Job] = deque()
        self._running: list[Job] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Recent gaps between arrivals, to tell whether waiting for company is likely to pay.
        self._gaps: deque[float] = deque(maxlen=ARRIVAL_HISTORY)
        self._last_arrival: float | None = None

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._running)

    async def start(self) -> None:
        await super().start()
        self._task = asyncio.create_task(self._serve(), name="batcher")

    def submit(
        self, request: GenerationRequest, *, timeout_s: float, on_event: EventCallback | None = None
    ) -> Job:
        self._admit()
        if len(self._queue) >= self.config.max_queue:
            raise self._overloaded()
        job = Job(request, deadline=time.monotonic() + timeout_s, on_event=on_event)
        self.record_arrival(job.enqueued_at)
        self._queue.append(job)
        job.last_position = len(self._queue) - 1
        job.emit(Queued(job.last_position))
        self._idle.clear()
        self._wakeup.set()
        return job

    def _pending(self) -> list[Job]:
        return [*self._queue, *self._running]

    async def _halt(self) -> list[Job]:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        unfinished = self._pending()
        self._queue.clear()
        return unfinished

    def record_arrival(self, now: float) -> None:
        if self._last_arrival is not None:
            self._gaps.append(now - self._last_arrival)
        self._last_arrival = now

    def companions_likely(self) -> bool:
        """Whether another request is likely to arrive within `max_wait_ms`.

        With `adaptive_wait`, an idle device waits for company only when at least 40% of recent
        arrival gaps were shorter than the wait (for Poisson arrivals: at least ~0.5 expected
        companions). A lone client sending one request at a time then pays no wait at all, while
        bursts (a chat channel, several clients) still fill batches. With little history, wait.
        """
        if not self.config.adaptive_wait or len(self._gaps) < MIN_ARRIVAL_HISTORY:
            return True
        gaps = sorted(self._gaps)
        return gaps[int(0.4 * (len(gaps) - 1))] <= self.config.max_wait_ms / 1000

    # -- internals -----------------------------------------------------------------------------

    async def _serve(self) -> None:
        max_wait = self.config.max_wait_ms / 1000
        device_free_at = 0.0
        while True:
            self._drop_unwanted()
            if not self._queue:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch, full = self._select()
            # The wait counts from when the device became free, not only from the oldest arrival: a
            # request that queued during the last batch still waits for the clients that batch just
            # answered. Otherwise groups of clients fall out of step and batches stay split.
            wait_left = max(self._queue[0].enqueued_at, device_free_at) + max_wait - time.monotonic()
            if not full and wait_left > 0 and self._state != "stopping" and self.companions_likely():
                # Idle device, partial batch: give concurrent requests a moment to join.
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=wait_left)
                continue
            for job in batch:
                self._queue.remove(job)
            await self._run(batch)
            device_free_at = time.monotonic()

    def _drop_unwanted(self) -> None:
        now = time.monotonic()
        kept: deque[Job] = deque()
        for job in self._queue:
            if job.future.done():
                self.metrics.dropped.labels("cancelled").inc()
                log.info("dropped a queued request whose client went away")
            elif now >= job.deadline:
                job.future.set_exception(
                    DeadlineExceeded("the request's deadline passed while it was queued")
                )
                self.metrics.dropped.labels("deadline").inc()
            else:
                kept.append(job)
        self._queue = kept

    def _select(self) -> tuple[list[Job], bool]:
        """The oldest job plus compatible ones (FIFO) within the limits; and whether it is full."""
        head = self._queue[0]
        key = head.request.batch_key()
        batch = [head]
        images, pixels = head.request.n, head.request.pixels
        per_image = head.request.width * head.request.height
        for job in list(self._queue)[1:]:
            req = job.request
            if req.batch_key() != key:
                continue
            if (
                images + req.n > self.config.max_batch_size
                or pixels + req.pixels > self.config.max_batch_pixels
            ):
                continue
            batch.append(job)
            images += req.n
            pixels += req.pixels
        full = images >= self.config.max_batch_size or pixels + per_image > self.config.max_batch_pixels
        return batch, full

    async def _run(self, batch: list[Job]) -> None:
        started = time.monotonic()
        size = sum(job.request.n for job in batch)
        self._running = batch
        for job in batch:
            job.started_at = started
            self.metrics.queue_wait.observe(started - job.enqueued_at)
            job.emit(Started(size))
        self._announce_positions()

        def on_progress(step: int, total: int, previews: RequestPreviews | None = None) -> None:
            for job in batch:
                job.emit(Progress(step, total))
            for request, pngs in previews or ():
                for job in batch:
                    if job.request is request:
                        for index, png in enumerate(pngs):
                            job.emit(Preview(step, total, index, png))

        # Progress crosses threads (a wake-up of the event loop per step, competing for the GIL with
        # the pipeline thread): only pay for it when a streaming client listens.
        listening = any(job.listening for job in batch)

        def should_stop() -> bool:
            # Read on the worker thread: plain attribute reads, and a stale answer costs one step.
            return self._abort or all(job.future.done() for job in batch)

        try:
            report = await self.runner.run(
                [job.request for job in batch], on_progress if listening else None, should_stop
            )
        except asyncio.CancelledError:
            raise
        except Exception:  # the runner reports per-request failures itself; this is a bug
            log.exception("batch failed")
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(EngineError("internal error (see the server log)"))
            self._running = []
            return
        finally:
            self._running = []
        finished = time.monotonic()
        for call_size in report.call_sizes:
            self.metrics.pipeline_calls.inc()
            self.metrics.batch_size.observe(call_size)
        for job, outcome in zip(batch, report.outcomes, strict=True):
            self.metrics.run_latency.observe(report.run_s)
            if job.future.done():
                continue  # the submitter gave up while the batch ran
            if outcome.error is not None:
                job.future.set_exception(outcome.error)
                continue
            assert outcome.images is not None
            self.metrics.images.inc(len(outcome.images))
            req = job.request
            job.future.set_result(
                GenerationResult(
                    images=outcome.images,
                    seeds=req.seeds,
                    width=req.width,
                    height=req.height,
                    steps=req.steps,
                    model=req.model or self.runner.model_name,
                    batch_size=outcome.batch_images,
                    queue_s=started - job.enqueued_at,
                    run_s=finished - started,
                    total_s=finished - job.enqueued_at,
                )
            )

    def _announce_positions(self) -> None:
        for position, job in enumerate(self._queue):
            if job.last_position != position:
                job.last_position = position
                job.emit(Queued(position))
