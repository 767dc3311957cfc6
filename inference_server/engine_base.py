"""`EngineBase`: the lifecycle both engines share; they differ only in how they batch.

Loading in the background (`start` returns at once, `/ready` follows `state`), the states loading ->
ok | failed -> stopping, admission (a stopping or unready engine refuses at once, with Retry-After),
and shutdown: refuse new work, let queued and running jobs finish within the grace period, then
interrupt what is left and fail it with `ShuttingDown`. A subclass says how it loads (`_prepare`),
how many requests wait (`queue_depth`), what is still unfinished (`_pending`) and how its serving
stops (`_halt`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod

from inference_server.config import BatchingConfig
from inference_server.engine import (
    EngineInfo,
    EngineLoad,
    EngineState,
    Job,
    NotReady,
    Overloaded,
    ShuttingDown,
)
from inference_server.metrics import Metrics
from inference_server.pipelines import PipelineRunner

log = logging.getLogger(__name__)


class EngineBase(ABC):
    """An `Engine` over a `PipelineRunner`, minus the batching (see the module docstring)."""

    @property
    @abstractmethod
    def name(self) -> str:
        """ "dynamic" | "continuous": what `/health` and `/metrics` report."""

    def __init__(self, runner: PipelineRunner, config: BatchingConfig, metrics: Metrics) -> None:
        self.runner = runner
        self.config = config
        self.metrics = metrics
        self._state: EngineState = "loading"
        self._load_error: BaseException | None = None
        self._load_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Set while no job is queued or running: shutdown waits on it (within the grace period).
        self._idle = asyncio.Event()
        self._idle.set()
        # Set when the grace period ran out: a running pipeline call stops at its next step.
        self._abort = False

    # -- Engine interface ----------------------------------------------------------------------

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def ready(self) -> bool:
        return self.state == "ok"

    @property
    @abstractmethod
    def queue_depth(self) -> int: ...

    @property
    def max_batch_size(self) -> int:
        return self.config.max_batch_size

    @property
    def load(self) -> EngineLoad:
        queued = self.queue_depth
        # `_pending` holds queued and running jobs alike: the rest of it is what runs now.
        return EngineLoad(queued, max(0, len(self._pending()) - queued), self.max_batch_size)

    @property
    def info(self) -> EngineInfo:
        return self.runner.info

    @property
    def load_error(self) -> BaseException | None:
        return self._load_error

    async def start(self) -> None:
        """Start loading (in the background) and serving; returns at once."""
        self._loop = asyncio.get_running_loop()
        self._load_task = asyncio.create_task(self._load(), name=f"{self.name}-load")

    async def wait_ready(self) -> None:
        if self._load_task is None:
            raise RuntimeError("start() the engine first")
        await asyncio.shield(self._load_task)
        if self._load_error is not None:
            raise self._load_error

    async def stop(self, grace_s: float) -> None:
        """Refuse new work; let queued and running jobs finish for up to `grace_s`; fail the rest."""
        if self._state != "failed":
            self._state = "stopping"
        unfinished = self._pending()
        if unfinished:
            log.info("draining %d requests (grace %.0f s)", len(unfinished), grace_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=grace_s)
        self._abort = True
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._load_task
        for job in await self._halt():
            if not job.future.done():
                job.future.set_exception(ShuttingDown("the server shut down before this request finished"))
                self.metrics.dropped.labels("shutdown").inc()
        self.runner.close()

    # -- for subclasses ------------------------------------------------------------------------

    def _admit(self) -> None:
        """Raise at once when this engine can't take a request now (before any work is queued)."""
        if self._state == "stopping":
            raise ShuttingDown("the server is shutting down", retry_after_s=self.config.retry_after_s)
        if self._state != "ok":
            raise NotReady(f"the model is {self._state}", retry_after_s=self.config.retry_after_s)

    def _overloaded(self, message: str | None = None) -> Overloaded:
        return Overloaded(
            message or f"the queue is full ({self.config.max_queue} requests waiting)",
            retry_after_s=self.config.retry_after_s,
        )

    async def _prepare(self) -> None:
        """Load (and warm up) what serving needs; runs in the background after `start`."""
        await self.runner.load()

    def _log_ready(self) -> None:
        log.info("ready: %s on %s (%s)", self.runner.model_name, self.runner.device, self.runner.dtype)

    @abstractmethod
    def _pending(self) -> list[Job]:
        """The jobs admitted and not finished yet (queued or running)."""

    @abstractmethod
    async def _halt(self) -> list[Job]:
        """Stop serving after the grace period; return the jobs that never finished."""

    async def _load(self) -> None:
        try:
            await self._prepare()
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            self._load_error = e
            self._state = "failed"
            log.error("model loading failed: %s", e)
            return
        if self._state == "loading":
            self._state = "ok"
            self._log_ready()
