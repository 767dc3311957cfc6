"""Hugging Face Inference API text-to-image: the backend of the Gradio app this project grew from.

`POST {base_url}/models/{model}` with `{"inputs": prompt, "parameters": {...}}` returns the image
bytes (usually JPEG; converted to PNG here). The API makes one image per call, so a job of n images
is n calls, one seed each. A cold model answers 503 `{"error": "... is currently loading",
"estimated_time": s}`: we wait (bounded by `max_loading_wait_s` in total) and try again. 429 is
retried after `Retry-After`. Only text-to-image exists there: img2img and inpainting are refused
with `UnsupportedTask`, which the core turns into a clear message for the user.
"""

from __future__ import annotations

import asyncio
import io
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import aiohttp
from PIL import Image, UnidentifiedImageError

from .base import (
    BackendError,
    BackendEvent,
    BackendRejected,
    BackendUnavailable,
    EventCallback,
    GeneratedImage,
    GenerationParams,
    UnsupportedTask,
)

log = logging.getLogger(__name__)

API_KEY_ENV = "HUGGING_FACE_API_KEY"
DEFAULT_BASE_URL = "https://api-inference.huggingface.co"

# Transient failures (429 without Retry-After, 5xx, dropped connections) get this many tries per
# image; past that the API is having an outage and the dispatcher's own retry later is better.
MAX_TRANSIENT_ATTEMPTS = 4
# When the API gives no estimate for a loading model, poll this often (its loads take 20 s - minutes).
DEFAULT_LOADING_POLL_S = 10.0
# Error text from the API reaches chat users: keep it to a line.
MAX_ERROR_MESSAGE_CHARS = 300


class HuggingFaceBackend:
    """`InferenceBackend` over the Hugging Face Inference API (text-to-image only)."""

    name = "huggingface"

    def __init__(
        self,
        api_key: str,
        *,
        model: str,
        base_url: str = DEFAULT_BASE_URL,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 10.0,
        max_loading_wait_s: float = 300.0,
        retry_after_max_s: float = 30.0,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 15.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        if not api_key:
            raise ValueError(f"a Hugging Face API key is required ({API_KEY_ENV})")
        self.model = model
        self._url = f"{base_url.rstrip('/')}/models/{quote(model, safe='/')}"
        self._api_key = api_key
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, connect=connect_timeout_s)
        self._max_loading_wait_s = max_loading_wait_s
        self._retry_after_max_s = retry_after_max_s
        self._backoff_base_s = backoff_base_s
        self._backoff_max_s = backoff_max_s
        self._sleep = sleep  # injected so tests can see the waits chosen without waiting
        self._rng = rng or random.Random()
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def generate(
        self, params: GenerationParams, on_event: EventCallback | None = None
    ) -> list[GeneratedImage]:
        if params.task != "txt2img":
            raise UnsupportedTask(
                f"{params.task} is not supported by the Hugging Face backend (text-to-image only)", "task"
            )
        if self._closed:
            raise BackendUnavailable("the Hugging Face backend is closed")
        if not params.prompt.strip():
            raise BackendRejected("prompt must not be empty", "prompt")
        await _emit(on_event, BackendEvent("started", extra={"batch_size": 1}))
        images = []
        for i, seed in enumerate(params.seeds):
            images.append(GeneratedImage(png=await self._one_image(params, seed), seed=seed))
            # The API reports no denoising steps; images done out of images asked is the progress
            # there is (extra.unit says so, for adapters that word it differently).
            await _emit(
                on_event, BackendEvent("progress", step=i + 1, total=params.n, extra={"unit": "image"})
            )
        return images

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self._api_key}", "User-Agent": "imagine-bot"}
            )
        return self._session

    async def _one_image(self, params: GenerationParams, seed: int) -> bytes:
        parameters: dict[str, Any] = {
            "num_inference_steps": params.steps,
            "guidance_scale": params.guidance,
            "width": params.width,
            "height": params.height,
            "seed": seed,
        }
        if params.negative_prompt:
            parameters["negative_prompt"] = params.negative_prompt
        payload = {"inputs": params.prompt, "parameters": parameters}
        loading_waited = 0.0
        transient_failures = 0
        last_problem = ""
        while True:
            wait: float
            try:
                async with self._get_session().post(
                    self._url, json=payload, timeout=self._timeout, headers={"Accept": "image/png"}
                ) as resp:
                    if resp.status == 200:
                        return _to_png(await resp.read(), resp.content_type)
                    message, estimated = await _read_error(resp)
                    if resp.status in (401, 403):
                        raise BackendRejected(f"invalid Hugging Face API key (check {API_KEY_ENV})")
                    if resp.status == 404:
                        raise BackendRejected(
                            f"model {self.model!r} was not found on the Hugging Face Inference API", "model"
                        )
                    if resp.status == 503 and ("loading" in message.lower() or estimated is not None):
                        wait = estimated if estimated is not None else DEFAULT_LOADING_POLL_S
                        wait = max(1.0, min(wait, self._max_loading_wait_s - loading_waited))
                        if loading_waited >= self._max_loading_wait_s:
                            raise BackendUnavailable(
                                f"the Hugging Face model {self.model} was still loading after "
                                f"{loading_waited:g} s; try again in a few minutes"
                            )
                        loading_waited += wait
                        log.info("HF model %s is loading; waiting %.1f s", self.model, wait)
                        await self._sleep(wait)
                        continue
                    if resp.status in (429, 503) or resp.status >= 500:
                        last_problem = (
                            "rate limited" if resp.status == 429 else f"HTTP {resp.status} {message}".strip()
                        )
                        wait = self._backoff(transient_failures)
                        retry_after = _parse_retry_after(resp.headers.get("Retry-After"))
                        if retry_after is not None:
                            wait = min(retry_after, self._retry_after_max_s)
                    else:
                        raise BackendRejected(
                            message or f"the Hugging Face API rejected the request (HTTP {resp.status})",
                            _field_from_message(message),
                        )
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
                if isinstance(e, TimeoutError) and not isinstance(e, aiohttp.ConnectionTimeoutError):
                    raise BackendUnavailable(
                        f"the Hugging Face API did not answer within {self._timeout.total:g} s"
                    ) from None
                last_problem = (
                    "cannot connect" if isinstance(e, aiohttp.ClientConnectorError) else "connection lost"
                )
                wait = self._backoff(transient_failures)
            except TimeoutError:
                raise BackendUnavailable(
                    f"the Hugging Face API did not answer within {self._timeout.total:g} s"
                ) from None
            transient_failures += 1
            if transient_failures >= MAX_TRANSIENT_ATTEMPTS:
                raise BackendUnavailable(
                    f"the Hugging Face Inference API is unavailable ({last_problem}) "
                    f"after {transient_failures} attempts"
                )
            log.warning("HF API: %s; retrying in %.1f s", last_problem, wait)
            await self._sleep(wait)

    def _backoff(self, failures: int) -> float:
        ceiling = min(self._backoff_max_s, self._backoff_base_s * (2**failures))
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)


async def _emit(on_event: EventCallback | None, event: BackendEvent) -> None:
    if on_event is None:
        return
    try:
        await on_event(event)
    except Exception:
        # A failing progress display must not cost the user their image.
        log.exception("progress callback failed for event %s", event.kind)


async def _read_error(resp: aiohttp.ClientResponse) -> tuple[str, float | None]:
    """(message, estimated_time) from the API's `{"error": ..., "estimated_time": ...}` body."""
    try:
        data = await resp.json(content_type=None)
    except (ValueError, aiohttp.ClientError):
        return resp.reason or "", None
    if not isinstance(data, dict):
        return resp.reason or "", None
    error = data.get("error")
    if isinstance(error, list):
        error = "; ".join(map(str, error))
    estimated = data.get("estimated_time")
    try:
        estimated = float(estimated) if estimated is not None else None
    except (TypeError, ValueError):
        estimated = None
    return str(error or resp.reason or "")[:MAX_ERROR_MESSAGE_CHARS], estimated


def _field_from_message(message: str) -> str | None:
    lowered = message.lower()
    for fld, words in (
        ("width", ("width",)),
        ("height", ("height",)),
        ("steps", ("num_inference_steps",)),
        ("guidance", ("guidance_scale",)),
        ("negative_prompt", ("negative_prompt",)),
        ("prompt", ("inputs", "prompt")),
    ):
        if any(w in lowered for w in words):
            return fld
    return None


def _to_png(data: bytes, content_type: str) -> bytes:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError):
        raise BackendError(
            f"the Hugging Face API answered with {content_type or 'unknown content'}, not an image"
        ) from None
    out = io.BytesIO()
    img.convert("RGBA" if img.mode in ("RGBA", "LA", "P") else "RGB").save(out, format="PNG")
    return out.getvalue()


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None
