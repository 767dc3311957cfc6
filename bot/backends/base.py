"""The interface between the bot core and whatever turns a job into images.

The core's dispatcher only knows this protocol; the project's inference server, the Hugging Face
Inference API and the in-process fake used by tests and benches all implement it. Backends raise
`BackendError` subclasses only, so the dispatcher can decide between retrying, failing the job with a
message for the user, and refunding quota without knowing which backend it talks to.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, get_args, runtime_checkable

# The jobs the bot makes; which of them a model does is in its `ModelCapabilities.tasks`.
Task = Literal["txt2img", "img2img", "inpaint"]
TASKS: tuple[Task, ...] = get_args(Task)


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA applied to a job at `weight` (the server's `loras: [{"name", "weight"}]`)."""

    name: str
    weight: float = 1.0


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
    # A model the server should use instead of its default (e.g. an upscaler); None = the default.
    # Needs a server that serves several models (the models registry).
    model: str | None = None
    # LoRAs the server applies for this request only (needs a server with a models registry).
    loras: tuple[LoraSpec, ...] = ()
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
    """Progress reported while a job waits or runs: kind 'queued' (position), 'started', 'progress',
    or 'waiting' (no server can be reached: the job waits for one to come back; `extra` has
    `waited_s` and `reason`), or 'preview' (step, total; `extra` holds `index`, the image's place,
    and `png`, a small PNG)."""

    kind: Literal["queued", "started", "progress", "waiting", "preview"]
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


class BackendOutage(BackendUnavailable):
    """No server has been reachable for the whole outage horizon: the job already waited that long,
    so it fails now rather than being tried again. `waited_s`: how long it waited."""

    retryable = False

    def __init__(self, message: str, *, waited_s: float):
        super().__init__(message)
        self.waited_s = waited_s


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


@dataclass(frozen=True)
class ModelCapabilities:
    """What the model behind a backend accepts and defaults to, as the inference server reports it
    (`capabilities` in its `/health`). The bot adapts its flags to it; nothing here is a constant
    of the bot's."""

    family: str  # "sd", "sd-v", "sdxl", "sd3", "flux-dev", "flux-schnell"
    label: str  # for messages: "FLUX.1-schnell"
    tasks: tuple[Task, ...]
    size_multiple: int
    default_width: int  # the size a job without --ar gets; --ar keeps about as many pixels
    default_height: int
    min_side: int
    max_side: int
    default_steps: int
    max_steps: int
    default_guidance: float
    max_guidance: float
    guidance: str  # "cfg" (classifier-free), "distilled" (FLUX.1-dev), "none" (FLUX.1-schnell)
    negative_prompt: str  # "cfg" (needs guidance > 1) or "true_cfg" (FLUX: always honoured)
    max_images: int
    max_prompt_chars: int

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelCapabilities:
        """From the server's JSON; `ValueError` naming the key when it is missing or malformed."""

        def get(key: str, kind: type) -> Any:
            value = data.get(key)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
                raise ValueError(f"capabilities.{key} is missing or not a {kind.__name__}: {value!r}")
            return value

        tasks = data.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise ValueError(f"capabilities.tasks is not a list of tasks: {tasks!r}")
        ints = (
            *("size_multiple", "default_width", "default_height", "min_side", "max_side"),
            *("default_steps", "max_steps", "max_images_per_request", "max_prompt_chars"),
        )
        if any(get(key, int) < 1 for key in ints):
            raise ValueError("capabilities: sizes, steps and limits must be positive")
        return cls(
            family=get("family", str),
            label=get("label", str),
            # Tasks the bot doesn't know (a newer server) are simply not offered.
            tasks=tuple(t for t in TASKS if t in tasks),
            size_multiple=get("size_multiple", int),
            default_width=get("default_width", int),
            default_height=get("default_height", int),
            min_side=get("min_side", int),
            max_side=get("max_side", int),
            default_steps=get("default_steps", int),
            max_steps=get("max_steps", int),
            default_guidance=get("default_guidance", float),
            max_guidance=get("max_guidance", float),
            guidance=get("guidance", str),
            negative_prompt=get("negative_prompt", str),
            max_images=get("max_images_per_request", int),
            max_prompt_chars=get("max_prompt_chars", int),
        )


@dataclass(frozen=True)
class ModelInfo:
    """One model the backend offers (an entry of the server's `GET /v1/models`): its capabilities,
    the LoRAs that work with it, and the servers that host it (for listings and logs)."""

    name: str
    family: str
    # None while a lazily loaded model has not been loaded yet (the server reads a family's details
    # from the loaded pipeline): jobs on it are held to `[bot]`'s settings, the server checks the rest.
    capabilities: ModelCapabilities | None
    loras: tuple[str, ...] = ()
    default: bool = False
    loaded: bool = True
    servers: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelInfo:
        """From one `/v1/models` entry; `ValueError` naming the key when it is missing or malformed."""
        name = data.get("id")
        if not isinstance(name, str) or not name:
            raise ValueError(f"model id is missing or not text: {name!r}")
        raw_caps = data.get("capabilities")
        loaded = data.get("loaded") is not False
        if raw_caps is None and not loaded:
            caps = None
        elif isinstance(raw_caps, Mapping):
            caps = ModelCapabilities.from_json(raw_caps)
        else:
            raise ValueError(f"model {name!r}: capabilities missing")
        loras = data.get("loras") or []
        if not isinstance(loras, list) or not all(isinstance(x, str) and x for x in loras):
            raise ValueError(f"model {name!r}: loras is not a list of names: {loras!r}")
        family = data.get("family")
        return cls(
            name=name,
            family=family if isinstance(family, str) and family else (caps.family if caps else ""),
            capabilities=caps,
            loras=tuple(dict.fromkeys(loras)),
            default=data.get("default") is True,
            loaded=loaded,
        )


@runtime_checkable
class InferenceBackend(Protocol):
    name: str

    async def capabilities(self) -> ModelCapabilities | None:
        """What the backend's model accepts now, or None when the backend doesn't say (the bot then
        uses `[bot]`'s settings). Never raises: an unreachable server is None too."""
        ...

    async def models(self) -> list[ModelInfo] | None:
        """The models a job may name (`GenerationParams.model`), the default first; None when the
        backend offers no choice (one model: `capabilities()`). Never raises."""
        ...

    def capacity(self) -> int | None:
        """Images the backend runs at once (the sum of its servers' batch sizes), as last reported;
        None when it doesn't say. The dispatcher sizes its concurrency from it."""
        ...

    async def generate(
        self, params: GenerationParams, on_event: EventCallback | None = None
    ) -> list[GeneratedImage]:
        """Run one job and return its images in seed order; raise BackendError on failure."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class ServerFleet(Protocol):
    """A backend in front of servers of its own (the project's inference servers), which can tell
    them apart: failures are reported per server, and it can say which servers answer."""

    def observe_server_errors(self, observer: Callable[[str, str], None]) -> None:
        """Call `observer(server, kind)` for every failed attempt at one server."""
        ...

    async def reachable_servers(self) -> list[str]:
        """The servers that answer their health check now. Never raises."""
        ...
