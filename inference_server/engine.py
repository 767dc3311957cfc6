"""The small interface between the HTTP layer and whatever runs the model.

HTTP routes (the `/v1` API in `app.py`, an OpenAI-compatible module, ...) turn a request into a
`GenerationRequest`, hand it to an `Engine` with `submit()`, and get back a `Job` whose events
(`Queued`, `Started`, `Progress`) arrive through the `on_event` callback on the event loop and whose
result is awaited with `Job.wait()`. Engines (the dynamic batcher in `batcher.py`, a continuous
batcher, ...) only see plain dataclasses and PIL images: this module imports neither aiohttp nor
torch, so both sides can depend on it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args

if TYPE_CHECKING:
    from PIL import Image

    from inference_server.families import ModelFamily

# What a request asks for; the native API has one route per task (`/v1/<task>`).
Task = Literal["txt2img", "img2img", "inpaint"]
TASKS: tuple[Task, ...] = get_args(Task)
# An engine's life: loading -> ok | failed, then stopping once shutdown starts.
EngineState = Literal["loading", "ok", "failed", "stopping"]


@dataclass(frozen=True)
class GenerationRequest:
    """One validated request: `len(seeds)` images from one prompt."""

    task: Task
    prompt: str
    negative_prompt: str
    seeds: tuple[int, ...]
    width: int
    height: int
    steps: int
    guidance: float
    scheduler: str = "default"
    strength: float | None = None
    # FLUX only: the true classifier-free guidance scale that makes a negative prompt act (None: off).
    true_cfg: float | None = None
    image: Image.Image | None = field(default=None, compare=False, repr=False)
    mask: Image.Image | None = field(default=None, compare=False, repr=False)
    # Lower joins first (ties: arrival order); the bot passes its fairness order. Only the
    # continuous engine reorders by it; the dynamic engine is FIFO.
    priority: int = 0
    # The registry's name of the model to run ("" = the default) and the LoRAs to apply to it,
    # ((name, weight), ...) sorted by name: requests batch only with the same model, set and weights.
    model: str = ""
    loras: tuple[tuple[str, float], ...] = ()
    # Step caching level (inference_server/step_cache.py): resolved from the request or [model] cache.
    cache: str = "off"
    # Send a preview every this many steps (0 = none): set for streaming clients from
    # [inference_server] preview_every_steps (or OpenAI's partial_images); not in the batch key.
    preview_every: int = 0

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def pixels(self) -> int:
        return self.n * self.width * self.height

    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys can share one pipeline call (these are scalars in diffusers)."""
        return (
            self.task,
            self.width,
            self.height,
            self.steps,
            self.guidance,
            self.strength,
            self.scheduler,
            self.true_cfg,
            self.model,
            self.loras,
            self.cache,  # a call caches at one level
        )


@dataclass(frozen=True)
class GenerationResult:
    images: list[Image.Image]
    seeds: tuple[int, ...]
    width: int
    height: int
    steps: int
    model: str
    batch_size: int  # images in the pipeline call this request ran in
    queue_s: float
    run_s: float
    total_s: float


# Events a job reports while it waits and runs; the HTTP layer streams them to the client.
@dataclass(frozen=True)
class Queued:
    position: int  # requests ahead of this one; 0 = next

    def to_json(self) -> dict[str, Any]:
        return {"event": "queued", "position": self.position}


@dataclass(frozen=True)
class Started:
    batch_size: int

    def to_json(self) -> dict[str, Any]:
        return {"event": "started", "batch_size": self.batch_size}


@dataclass(frozen=True)
class Progress:
    step: int
    total: int

    def to_json(self) -> dict[str, Any]:
        return {"event": "progress", "step": self.step, "total": self.total}


@dataclass(frozen=True)
class Preview:
    """A cheap preview (inference_server/previews.py) of image `index` of the request after `step`."""

    step: int
    total: int
    index: int
    png: bytes = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        import base64

        return {
            "event": "preview",
            "step": self.step,
            "total": self.total,
            "index": self.index,
            "png_base64": base64.b64encode(self.png).decode(),
        }


Event = Queued | Started | Progress | Preview
EventCallback = Callable[[Event], None]


class EngineError(Exception):
    """Base of the errors an engine reports; `kind` labels the error in metrics and HTTP mapping."""

    kind = "internal"

    def __init__(self, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class Overloaded(EngineError):
    kind = "overloaded"


class NotReady(EngineError):
    kind = "not_ready"


class ShuttingDown(EngineError):
    kind = "shutting_down"


class DeadlineExceeded(EngineError):
    kind = "deadline_exceeded"


class OutOfMemory(EngineError):
    kind = "out_of_memory"


class GenerationFailed(EngineError):
    kind = "generation_failed"


class Job:
    """A submitted request as its submitter sees it. Created by an engine, on the event loop."""

    def __init__(
        self, request: GenerationRequest, *, deadline: float, on_event: EventCallback | None
    ) -> None:
        self.request = request
        self.deadline = deadline  # time.monotonic() after which nobody wants the result
        self.enqueued_at = time.monotonic()
        self.started_at: float | None = None
        self.future: asyncio.Future[GenerationResult] = asyncio.get_running_loop().create_future()
        self._on_event = on_event
        self.last_position: int | None = None

    @property
    def cancelled(self) -> bool:
        """True once the submitter gave up (client gone, deadline) or the job has finished."""
        return self.future.done()

    def cancel(self) -> None:
        """Called by the submitter: the engine drops the job before it costs compute."""
        if not self.future.done():
            self.future.cancel()

    @property
    def listening(self) -> bool:
        """Whether anyone receives this job's events (a streaming client)."""
        return self._on_event is not None and not self.future.done()

    def emit(self, event: Event) -> None:
        if self._on_event is not None and not self.future.done():
            self._on_event(event)

    async def wait(self) -> GenerationResult:
        """The result; raises an `EngineError`. On deadline or cancellation the job is dropped."""
        remaining = self.deadline - time.monotonic()
        try:
            return await asyncio.wait_for(asyncio.shield(self.future), timeout=max(remaining, 0.0))
        except TimeoutError:
            self.cancel()
            raise DeadlineExceeded(
                f"the request's deadline passed after {time.monotonic() - self.enqueued_at:.1f} s"
            ) from None
        except asyncio.CancelledError:
            # The awaiting task was cancelled (client went away): drop the job too.
            self.cancel()
            raise


@dataclass(frozen=True)
class EngineLoad:
    """How busy an engine is, in requests: what a router in front of several servers balances on.
    `capacity` is the largest batch (images per pipeline call): a server with twice the capacity
    clears a queue about twice as fast, so routers compare (queued + running) / capacity."""

    queued: int
    running: int
    capacity: int

    def to_json(self) -> dict[str, int]:
        return {"queued": self.queued, "running": self.running, "max_batch_size": self.capacity}


@dataclass(frozen=True)
class EngineInfo:
    device: str
    dtype: str
    model: str
    attention: str
    family: ModelFamily | None = None  # None until the model is loaded


class Engine(Protocol):
    """What the HTTP layer needs from an engine. Both engines implement it on `engine_base.EngineBase`."""

    @property
    def name(self) -> str:
        """ "dynamic" | "continuous" """
        ...

    @property
    def state(self) -> EngineState: ...

    @property
    def ready(self) -> bool: ...

    @property
    def queue_depth(self) -> int: ...

    @property
    def max_batch_size(self) -> int: ...

    @property
    def load(self) -> EngineLoad:
        """Requests queued and running now, and the batch capacity (cheap: read on every response)."""
        ...

    @property
    def info(self) -> EngineInfo: ...

    async def start(self) -> None:
        """Start loading and serving; returns at once (loading goes on in the background)."""

    async def wait_ready(self) -> None:
        """Return once loaded and warmed; raise if loading failed."""

    def submit(
        self, request: GenerationRequest, *, timeout_s: float, on_event: EventCallback | None = None
    ) -> Job:
        """Queue a request or raise `Overloaded` / `NotReady` / `ShuttingDown` at once."""
        ...

    async def stop(self, grace_s: float) -> None:
        """Refuse new work, finish queued and running jobs for up to `grace_s`, fail the rest."""
