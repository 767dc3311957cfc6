"""`ContinuousBatchingEngine`: the server's `Engine` interface over the iteration-level scheduler.

Chosen with `[batching] engine = "continuous"`. Loading and warm-up go through the same
`PipelineRunner` as the request-level engine; then the scheduler in `core.py` owns the pipeline on its
own worker thread (the runner's thread stays idle, so one thread still drives the device). Events and
results come back to the event loop with `call_soon_threadsafe`; metrics are only touched there.

It serves every family (SD 1.x/2.x, SDXL, SD 3.x, FLUX.1; see `families.py`). Models it can't
run (a denoiser whose input isn't the plain latent: 9-channel inpainting UNets, FLUX Fill) fall back
to the request-level `DynamicBatchingEngine` over the same, already loaded `PipelineRunner`, with a
log line saying so; `name` (and so `/health` and `/metrics`) then says "dynamic".

torch is imported only when the engine starts: importing this module is cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from inference_server.batcher import DynamicBatchingEngine
from inference_server.config import BatchingConfig
from inference_server.continuous.families import unsupported_reason
from inference_server.engine import (
    EngineError,
    EngineLoad,
    EngineState,
    EventCallback,
    GenerationRequest,
    GenerationResult,
    Job,
    Overloaded,
    Preview,
    Progress,
    Queued,
    ShuttingDown,
    Started,
)
from inference_server.engine_base import EngineBase
from inference_server.errors import RequestError
from inference_server.metrics import Metrics
from inference_server.pipelines import PipelineRunner
from inference_server.pipelines import scheduler_factory as pipeline_scheduler_factory

if TYPE_CHECKING:
    from inference_server.continuous.core import ContinuousEngine

log = logging.getLogger(__name__)

# Iteration counts reach /metrics in batches at most this often (and whenever a request finishes),
# not with a wake-up of the event loop at every denoising step.
ITERATION_METRICS_INTERVAL_S = 0.5


class ContinuousBatchingEngine(EngineBase):
    """Iteration-level batching: requests join and leave the running batch at every denoising step."""

    # Decode finished latents on a second thread: None = yes except on MPS. The bench turns it off
    # to show what it is worth.
    decode_thread: bool | None = None

    def __init__(self, runner: PipelineRunner, config: BatchingConfig, metrics: Metrics) -> None:
        super().__init__(runner, config, metrics)
        self._core: ContinuousEngine | None = None
        self._fallback: DynamicBatchingEngine | None = None
        self._jobs: set[Job] = set()
        # Batch sizes of iterations not yet counted in the metrics: the worker appends, the loop
        # drains (deque appends and pops are thread-safe).
        self._iteration_sizes: deque[int] = deque()
        self._iterations_posted_at = 0.0
        metrics.gauge(
            "inference_continuous_running_samples",
            "Images in the continuous engine's running batch (0 with the dynamic engine).",
            lambda: self._core.running_samples if self._core is not None else 0,
        )
        metrics.gauge(
            "inference_engine_continuous",
            "1 when the continuous (iteration-level) engine serves, 0 when requests go to the dynamic one.",
            lambda: 1 if self.name == "continuous" else 0,
        )

    # -- Engine interface (a fallback engine, when there is one, answers instead) ----------------

    @property
    def name(self) -> str:
        return "dynamic" if self._fallback is not None else "continuous"

    @property
    def state(self) -> EngineState:
        if self._fallback is not None:
            return self._fallback.state
        return self._state

    @property
    def queue_depth(self) -> int:
        if self._fallback is not None:
            return self._fallback.queue_depth
        return self._core.queue_depth if self._core is not None else 0

    @property
    def load(self) -> EngineLoad:
        return self._fallback.load if self._fallback is not None else super().load

    @property
    def running(self) -> int:
        return self._core.running_samples if self._core is not None else 0

    async def wait_ready(self) -> None:
        await super().wait_ready()
        if self._fallback is not None:
            await self._fallback.wait_ready()

    def submit(
        self, request: GenerationRequest, *, timeout_s: float, on_event: EventCallback | None = None
    ) -> Job:
        if self._fallback is not None:
            return self._fallback.submit(request, timeout_s=timeout_s, on_event=on_event)
        self._admit()
        core = self._core
        loop = self._loop
        if core is None or loop is None:
            raise RuntimeError("the continuous engine is ok but has no scheduler")  # _prepare sets both
        from inference_server.continuous.core import ContinuousRequest, UnsupportedRequest

        job = Job(request, deadline=time.monotonic() + timeout_s, on_event=on_event)
        creq = ContinuousRequest(
            task=request.task,
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            seeds=request.seeds,
            width=request.width,
            height=request.height,
            steps=request.steps,
            guidance=request.guidance,
            scheduler=request.scheduler,
            strength=request.strength if request.strength is not None else 1.0,
            true_cfg=request.true_cfg,
            image=request.image,
            mask=request.mask,
            priority=request.priority,  # the client's (the bot's fairness order); lower joins first
            deadline=job.deadline,
            preview_every=request.preview_every,
            cache=request.cache,
        )

        def from_worker(event: dict[str, Any]) -> None:
            if event["event"] == "progress" and not job.listening:
                # Every running request steps every iteration: waking the event loop for progress
                # nobody reads would compete with the worker for the GIL at every step.
                return
            with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
                loop.call_soon_threadsafe(self._on_core_event, job, event)

        try:
            ticket = core.submit(creq, from_worker)
        except Overloaded as e:
            raise self._overloaded(e.message) from None
        except ShuttingDown as e:
            raise ShuttingDown(e.message, retry_after_s=self.config.retry_after_s) from None
        except UnsupportedRequest as e:
            # The API's validation catches these first; this keeps a gap there a 400, not a 500.
            raise RequestError(400, "invalid_request", None, e.message) from None
        self._jobs.add(job)
        self._idle.clear()
        # The submitter gives up by cancelling job.future (client gone, deadline in Job.wait()):
        # the request then leaves the running batch at the next step.
        job.future.add_done_callback(lambda f: core.cancel(ticket) if f.cancelled() else None)

        def done_on_worker(f: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
                loop.call_soon_threadsafe(self._on_core_done, job, f)

        ticket.future.add_done_callback(done_on_worker)
        return job

    async def stop(self, grace_s: float) -> None:
        if self._fallback is not None:
            await self._fallback.stop(grace_s)
            return
        await super().stop(grace_s)

    # -- internals -----------------------------------------------------------------------------

    def _pending(self) -> list[Job]:
        return list(self._jobs)

    async def _halt(self) -> list[Job]:
        if self._core is not None:
            await asyncio.to_thread(self._core.stop)
        unfinished = list(self._jobs)
        self._jobs.clear()
        return unfinished

    async def _prepare(self) -> None:
        await self.runner.load()
        pipe = self.runner.pipeline("inpaint")  # has every processor the three tasks need
        reason = unsupported_reason(pipe)
        if reason is not None:
            log.warning("continuous engine can't run this model (%s); using request-level batching", reason)
            # The request-level engine serves every request with this same runner: its load()
            # finds the model loaded and warmed and returns at once (the weights load once).
            self._fallback = DynamicBatchingEngine(self.runner, self.config, self.metrics)
            await self._fallback.start()
            return
        from inference_server.continuous.core import ContinuousEngine

        self._core = ContinuousEngine(
            pipe,
            max_batch_size=self.config.max_batch_size,
            max_batch_pixels=self.config.max_batch_pixels,
            max_queue=self.config.max_queue,
            admission=self.config.admission,
            scheduler_factory=scheduler_factory(pipe),
            on_iteration=self._from_worker_iteration,
            decode_thread=self.runner.device != "mps" if self.decode_thread is None else self.decode_thread,
        )
        self._core.start()

    def _log_ready(self) -> None:
        if self._fallback is not None:
            return  # the fallback engine says when it is ready
        log.info(
            "ready (continuous batching, up to %d images per step): %s on %s (%s)",
            self.config.max_batch_size,
            self.runner.model_name,
            self.runner.device,
            self.runner.dtype,
        )

    def _from_worker_iteration(self, batch: int, seconds: float) -> None:
        self._iteration_sizes.append(batch)
        now = time.monotonic()
        if now - self._iterations_posted_at < ITERATION_METRICS_INTERVAL_S:
            return
        self._iterations_posted_at = now
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._count_iterations)

    def _count_iterations(self) -> None:
        # For this engine a "pipeline call" is one denoising iteration over the running batch.
        while self._iteration_sizes:
            batch = self._iteration_sizes.popleft()
            self.metrics.pipeline_calls.inc()
            self.metrics.batch_size.observe(batch)

    def _on_core_event(self, job: Job, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "queued":
            job.last_position = event["position"]
            job.emit(Queued(event["position"]))
        elif kind == "started":
            job.started_at = time.monotonic()
            self.metrics.queue_wait.observe(job.started_at - job.enqueued_at)
            job.emit(Started(event["batch_size"]))
        elif kind == "progress":
            job.emit(Progress(event["step"], event["total"]))
        elif kind == "preview":
            job.emit(Preview(event["step"], event["total"], event["index"], event["png"]))

    def _on_core_done(self, job: Job, future: Any) -> None:
        self._count_iterations()
        self._jobs.discard(job)
        if not self._jobs:
            self._idle.set()
        if job.future.done():
            if job.future.cancelled():
                self.metrics.dropped.labels("cancelled").inc()
            return
        if future.cancelled():
            job.future.set_exception(EngineError("internal error: the request was cancelled in the engine"))
            return
        error = future.exception()
        if error is not None:
            if not isinstance(error, EngineError):
                log.error("continuous engine: unexpected failure", exc_info=error)
                error = EngineError("internal error (see the server log)")
            if error.kind == "deadline_exceeded":
                self.metrics.dropped.labels("deadline").inc()
            job.future.set_exception(error)
            return
        result = future.result()
        req = job.request
        self.metrics.run_latency.observe(result.run_s)
        self.metrics.images.inc(len(result.images))
        job.future.set_result(
            GenerationResult(
                images=result.images,
                seeds=req.seeds,
                width=req.width,
                height=req.height,
                steps=req.steps,
                model=self.runner.model_name,
                batch_size=result.batch_size,
                queue_s=result.queue_s,
                run_s=result.run_s,
                total_s=result.total_s,
            )
        )


def scheduler_factory(pipe: Any) -> Any:
    """Fresh scheduler instances by the API's names (the same table and factory the request-level
    runner uses)."""
    return pipeline_scheduler_factory(pipe.scheduler)
