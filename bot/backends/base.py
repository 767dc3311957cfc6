"""The interface between the bot core and whatever turns a job into images.

The core's dispatcher only knows this protocol; the project's inference server, the Hugging Face
Inference API and the in-process fake used by tests and benches all implement it. Backends raise
`BackendError` subclasses only, so the dispatcher can decide between retrying, failing the job with a
message for the user, and refunding quota without knowing which backend it talks to.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

Task = Literal["txt2img", "img2img", "inpaint"]


@dataclass(frozen=True)
class GenerationParams:
    """Everything a backend needs for one job; `n` images use `seeds[i]` each (len(seeds) == n)."""

    task: Task
    prompt: str
    negative_prompt: str = ""
    seeds: tuple[int, ...] = (0,)
    width: int = 64
    height: int = 64
    steps: int = 20
    guidance: float = 7.5
    strength: float = 0.6  # img2img/inpaint only
    image: bytes | None = None  # PNG/JPEG/WebP bytes for img2img and inpaint
    mask: bytes | None = None  # inpaint: white = repaint, same size as image
    priority: int = 0  # lower runs first where the backend supports it
    timeout_s: float | None = None

    @property
    def n(self) -> int:
        return len(self.seeds)


@dataclass(frozen=True)
class GeneratedImage:
    png: bytes
    seed: int


@dataclass(frozen=True)
class BackendEvent:
    """Progress reported while a job waits or runs: kind 'queued' (position), 'started', 'progress'."""

    kind: Literal["queued", "started", "progress"]
    position: int | None = None
    step: int | None = None
    total: int | None = None
    extra: dict = field(default_factory=dict)


EventCallback = Callable[[BackendEvent], Awaitable[None]]


class BackendError(Exception):
    """Base class. `retryable` tells the dispatcher whether trying again later may succeed;
    `retry_after_s`, when the backend was told how long to wait (a 429's Retry-After), how soon."""

    retryable = False

    def __init__(self, message: str, *, retry_after_s: float | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class BackendUnavailable(BackendError):
    """No server answered, or every server is overloaded (after the backend's own retries)."""

    retryable = True


class BackendRejected(BackendError):
    """The backend refused this job's input (a 4xx): retrying the same job cannot succeed."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class UnsupportedTask(BackendRejected):
    """This backend cannot do this task (e.g. inpainting on an API that only does text-to-image)."""


def describe_wait(seconds: float) -> str:
    """A wait as users read it: "40 s", "5 min", "2 h"; rounded up, since sooner fails again."""
    if seconds < 90:
        return f"{max(1, math.ceil(seconds))} s"
    if seconds < 90 * 60:
        return f"{math.ceil(seconds / 60)} min"
    return f"{math.ceil(seconds / 3600)} h"


@runtime_checkable
class InferenceBackend(Protocol):
    name: str

    async def generate(
        self, params: GenerationParams, on_event: EventCallback | None = None
    ) -> list[GeneratedImage]:
        """Run one job and return its images in seed order; raise BackendError on failure."""
        ...

    async def close(self) -> None: ...
