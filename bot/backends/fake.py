"""An instant, in-process, deterministic backend for tests and benches of the bot core.

It implements the real `InferenceBackend` protocol: it validates its input like a server would,
returns real PNGs (a colour derived from the prompt and seed, with the seed drawn in, so two images
can be told apart by eye and by bytes), and reports queued/started/progress events. Its knobs exist
for the core's tests: inject failures (`fail_next`), slow jobs down (`delay_s`), hold them until a
test lets go (`hold`/`release`), cap concurrency (so queue positions are real), and a call log.
It is a fake of the backend, never of the thing under test: nothing here decides quotas or retries.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, UnidentifiedImageError

from .base import (
    BackendError,
    BackendEvent,
    BackendRejected,
    BackendUnavailable,
    EventCallback,
    GeneratedImage,
    GenerationParams,
    ModelCapabilities,
    ModelInfo,
    Task,
    UnsupportedTask,
)

# Same bounds as the inference server's defaults ([inference_server] in config.toml), so a job the
# fake accepts is one the real server would accept too (core tests must not pass on a lax fake).
MAX_N = 4
MAX_SIDE = 1024
MAX_STEPS = 150
MAX_PROMPT_CHARS = 1000
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class FakeCall:
    """One `generate` call as the fake saw it; `outcome` is "ok", "failed" or "cancelled"."""

    params: GenerationParams
    outcome: str = "ok"
    error: str | None = None


ErrorFactory = Callable[[GenerationParams], BackendError]


class FakeBackend:
    """Deterministic in-process backend. Same params and seed -> byte-identical PNG."""

    def __init__(
        self,
        *,
        name: str = "fake",
        delay_s: float = 0.0,
        concurrency: int | None = None,
        tasks: Iterable[Task] = ("txt2img", "img2img", "inpaint"),
        progress_events: bool = True,
        models: Sequence[ModelInfo] | None = None,
        preview_every: int = 0,
    ) -> None:
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s!r}")
        if concurrency is not None and concurrency < 1:
            raise ValueError(f"concurrency must be >= 1 or None, got {concurrency!r}")
        self.name = name
        self.delay_s = delay_s
        self.tasks = frozenset(tasks)
        self.progress_events = progress_events
        # A "preview" event per image every this many steps (0 = none), as the inference server sends.
        self.preview_every = preview_every
        # The models it offers, as a server with a models registry would (None: no choice).
        self.models_offered = list(models) if models is not None else None
        self.calls: list[FakeCall] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.closed = False
        self._concurrency = concurrency
        self._running = 0
        self._waiting: list[asyncio.Future[None]] = []
        self._failures: list[BackendError | ErrorFactory] = []
        self._released = asyncio.Event()
        self._released.set()

    # --- knobs for tests -------------------------------------------------------------------------

    def fail_next(self, count: int = 1, error: BackendError | ErrorFactory | None = None) -> None:
        """Make the next `count` calls raise `error` (default: a retryable BackendUnavailable)."""
        if error is None:
            error = BackendUnavailable("fake backend: injected failure (server unreachable)")
        self._failures.extend([error] * count)

    @property
    def pending_failures(self) -> int:
        return len(self._failures)

    def hold(self) -> None:
        """Jobs that start from now on wait (after their 'started' event) until `release()`."""
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    @property
    def succeeded(self) -> list[GenerationParams]:
        return [c.params for c in self.calls if c.outcome == "ok"]

    # --- the protocol ----------------------------------------------------------------------------

    async def generate(
        self, params: GenerationParams, on_event: EventCallback | None = None
    ) -> list[GeneratedImage]:
        if self.closed:
            raise BackendUnavailable(f"{self.name} backend is closed")
        call_index = len(self.calls)
        self.calls.append(FakeCall(params, outcome="running"))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            images = await self._generate(params, on_event)
        except asyncio.CancelledError:
            self.calls[call_index] = FakeCall(params, "cancelled")
            raise
        except BackendError as e:
            self.calls[call_index] = FakeCall(params, "failed", e.message)
            raise
        finally:
            self.in_flight -= 1
        self.calls[call_index] = FakeCall(params, "ok")
        return images

    async def capabilities(self) -> ModelCapabilities | None:
        """None: the fake has no model, so the bot uses `[bot]`'s sizes and defaults."""
        return None

    async def models(self) -> list[ModelInfo] | None:
        return None if self.models_offered is None else list(self.models_offered)

    def capacity(self) -> int | None:
        """None: the fake runs any number of jobs at once."""
        return None

    async def close(self) -> None:
        self.closed = True
        self._released.set()

    # --- internals -------------------------------------------------------------------------------

    async def _generate(
        self, params: GenerationParams, on_event: EventCallback | None
    ) -> list[GeneratedImage]:
        base, mask = self._validate(params)
        if self._failures:
            failure = self._failures.pop(0)
            raise failure if isinstance(failure, BackendError) else failure(params)

        async def emit(event: BackendEvent) -> None:
            if on_event is not None and self.progress_events:
                await on_event(event)

        await self._acquire_slot(emit)
        try:
            await emit(BackendEvent("started", extra={"batch_size": 1}))
            await self._released.wait()
            if self.closed:
                raise BackendUnavailable(f"{self.name} backend is closed")
            per_step = self.delay_s / params.steps
            for step in range(1, params.steps + 1):
                if per_step:
                    await asyncio.sleep(per_step)
                await emit(BackendEvent("progress", step=step, total=params.steps))
                if self.preview_every and step % self.preview_every == 0 and step < params.steps:
                    for index, seed in enumerate(params.seeds):
                        png = _preview_png(colour_for(params, seed))
                        extra = {"index": index, "png": png}
                        await emit(BackendEvent("preview", step=step, total=params.steps, extra=extra))
            return [GeneratedImage(png=render(params, seed, base, mask), seed=seed) for seed in params.seeds]
        finally:
            self._release_slot()

    async def _acquire_slot(self, emit: EventCallback) -> None:
        if self._concurrency is None or (self._running < self._concurrency and not self._waiting):
            self._running += 1
            await emit(BackendEvent("queued", position=0))
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(fut)
        await emit(BackendEvent("queued", position=len(self._waiting)))
        try:
            await fut  # _release_slot hands its slot over, so _running stays counted
        except asyncio.CancelledError:
            if fut in self._waiting:
                self._waiting.remove(fut)
            elif fut.done() and not fut.cancelled():
                self._release_slot()  # we were handed a slot just as we were cancelled
            raise

    def _release_slot(self) -> None:
        if self._concurrency is None:
            self._running -= 1
            return
        while self._waiting:
            fut = self._waiting.pop(0)
            if not fut.done():
                fut.set_result(None)
                return
        self._running -= 1

    def _validate(self, params: GenerationParams) -> tuple[Image.Image | None, Image.Image | None]:
        if params.task not in ("txt2img", "img2img", "inpaint"):
            raise BackendRejected(f"unknown task {params.task!r}", "task")
        if params.task not in self.tasks:
            raise UnsupportedTask(f"{params.task} is not supported by the {self.name} backend", "task")
        if not params.prompt.strip():
            raise BackendRejected("prompt must not be empty", "prompt")
        self._validate_model(params)
        if len(params.prompt) > MAX_PROMPT_CHARS:
            raise BackendRejected(
                f"prompt is {len(params.prompt)} characters, the limit is {MAX_PROMPT_CHARS}", "prompt"
            )
        if not 1 <= params.n <= MAX_N:
            raise BackendRejected(f"n must be between 1 and {MAX_N}, got {params.n}", "n")
        for seed in params.seeds:
            if not 0 <= seed <= MAX_SEED:
                raise BackendRejected(f"seed must be between 0 and {MAX_SEED}, got {seed}", "seed")
        for fld, value in (("width", params.width), ("height", params.height)):
            if value <= 0 or value % 8 or value > MAX_SIDE:
                raise BackendRejected(
                    f"{fld} must be a multiple of 8 between 8 and {MAX_SIDE}, got {value}", fld
                )
        if not 1 <= params.steps <= MAX_STEPS:
            raise BackendRejected(f"steps must be between 1 and {MAX_STEPS}, got {params.steps}", "steps")
        if not 0 <= params.guidance <= 30:
            raise BackendRejected(f"guidance must be between 0 and 30, got {params.guidance}", "guidance")
        base: Image.Image | None = None
        mask: Image.Image | None = None
        if params.task in ("img2img", "inpaint"):
            if not 0 < params.strength <= 1:
                raise BackendRejected(f"strength must be in (0, 1], got {params.strength}", "strength")
            base = _open_image(params.image, "image")
            if params.task == "inpaint":
                mask = _open_image(params.mask, "mask")
                if mask.size != base.size:
                    raise BackendRejected(
                        f"mask size {mask.size[0]}x{mask.size[1]} differs from image size "
                        f"{base.size[0]}x{base.size[1]}",
                        "mask",
                    )
        return base, mask

    def _validate_model(self, params: GenerationParams) -> None:
        """The checks of a server with a models registry: the model and its LoRAs must exist."""
        if params.model is None and not params.loras:
            return
        offered = {m.name: m for m in self.models_offered or ()}
        model = offered.get(params.model) if params.model else next(iter(offered.values()), None)
        if model is None:
            raise BackendRejected(f"unknown model {params.model!r}", "model")
        for i, lora in enumerate(params.loras):
            if lora.name not in model.loras:
                raise BackendRejected(f"unknown LoRA {lora.name!r} for {model.name}", f"loras[{i}].name")


def _preview_png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


def _open_image(data: bytes | None, fld: str) -> Image.Image:
    if not data:
        raise BackendRejected(f"{fld} is required for this task", fld)
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError):
        raise BackendRejected(f"{fld} is not a PNG, JPEG or WebP image", fld) from None
    return img


def colour_for(params: GenerationParams, seed: int) -> tuple[int, int, int]:
    """The flat colour the fake paints for this prompt and seed (tests can predict it)."""
    digest = hashlib.sha256(f"{params.prompt}\x00{params.negative_prompt}\x00{seed}".encode()).digest()
    return digest[0], digest[1], digest[2]


def render(
    params: GenerationParams, seed: int, base: Image.Image | None = None, mask: Image.Image | None = None
) -> bytes:
    size = (params.width, params.height)
    colour = colour_for(params, seed)
    img = Image.new("RGB", size, colour)
    # Draw the seed so a human looking at a test artefact can tell the images apart.
    ink = (255, 255, 255) if sum(colour) < 384 else (0, 0, 0)
    ImageDraw.Draw(img).text((2, 2), str(seed), fill=ink)
    if base is not None:
        src = base.convert("RGB").resize(size)
        if mask is not None:
            # Keep the black part of the mask from the source, repaint the white part.
            img = Image.composite(img, src, mask.convert("L").resize(size))
        else:
            img = Image.blend(src, img, params.strength)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()
