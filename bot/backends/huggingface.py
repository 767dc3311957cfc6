"""Hugging Face Inference Providers: the backend of the Gradio app this project grew from.

All HTTP is huggingface_hub's `AsyncInferenceClient`: routing through `router.huggingface.co` to
the provider (`hf-inference`, `fal-ai`, `replicate`, ... or `auto`), or straight to `base_url`;
auth; and errors (`HfHubHTTPError` carrying the response, `InferenceTimeoutError`). This module
decides what a job becomes (providers make one image per call: a job of n images is n calls, one
seed each) and what each failure means: retry later (`BackendUnavailable`, with the wait when the
provider gave one), or tell the user why (`BackendRejected`, `UnsupportedTask`), in one line.

Before its first call for a model the client looks the model up on the Hub (which provider serves
it, under which id) with a blocking request made inside its async methods, without a timeout.
`_route` makes that lookup in a worker thread first: the client's own lookup then hits its cache,
so the bot's event loop never waits on the Hub, and "this provider does not serve this model for
this task" becomes a clear message before any image is paid for.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import logging
import re
import time
from typing import Any

import httpx2
from huggingface_hub import AsyncInferenceClient, HfApi, ImageToImageTargetSize
from huggingface_hub.errors import (
    HfHubHTTPError,
    InferenceTimeoutError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from huggingface_hub.inference._providers import PROVIDERS, get_provider_helper
from huggingface_hub.utils import parse_ratelimit_headers
from PIL import Image

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
    UnsupportedTask,
    describe_wait,
)

log = logging.getLogger(__name__)

# The token is read from the first of these that is set: the original app's name, then the one
# huggingface_hub's own tools use.
TOKEN_ENVS = ("HUGGING_FACE_API_KEY", "HF_TOKEN")
# Our tasks as the client's provider tables name them. Inpainting has no task there at all.
HUB_TASKS = {"txt2img": "text-to-image", "img2img": "image-to-image"}
TASK_NAMES = {"txt2img": "text-to-image", "img2img": "variations (image-to-image)", "inpaint": "inpainting"}
# A provider's message reaches chat users: one line, this long at most.
MAX_MESSAGE_CHARS = 300
# Words providers use when their safety filter refuses a prompt or an image.
CONTENT_REFUSED = re.compile(
    r"nsfw|content[ _-]?polic|safety|unsafe|flagged|moderation|inappropriate|prohibited", re.I
)
# ...and when the model asked for is not one they serve.
MODEL_NOT_SERVED = re.compile(
    r"model\b.*\b(not supported|not found|does not exist|not available|not served|unknown)|unknown model",
    re.I,
)


class HuggingFaceBackend:
    """`InferenceBackend` over Hugging Face Inference Providers (text-to-image, image-to-image)."""

    name = "huggingface"

    def __init__(
        self,
        token: str,
        *,
        model: str,
        provider: str = "auto",
        image_to_image_model: str = "",
        base_url: str = "",
        timeout_s: float = 120.0,
        retry_after_max_s: float = 30.0,
    ) -> None:
        if not token:
            raise ValueError(f"a Hugging Face token is required ({' or '.join(TOKEN_ENVS)})")
        self.model = model
        self.image_to_image_model = image_to_image_model or model
        self.provider = provider
        self.base_url = base_url
        self.timeout_s = timeout_s
        self.retry_after_max_s = retry_after_max_s
        self._token = token
        self._routes: dict[str, str] = {}  # hub task -> the provider the lookup found serving it
        # One client per provider in use (the client takes its provider at construction). A client
        # opens no connection until its first call, which happens inside the event loop.
        self._clients: dict[str, AsyncInferenceClient] = {}
        self._closed = False

    async def capabilities(self) -> ModelCapabilities | None:
        """None: Inference Providers don't describe their models' limits, so the bot uses `[bot]`'s sizes and defaults."""
        return None

    async def models(self) -> list[ModelInfo] | None:
        """None: the configured Hub models are the only choice (`[backends.huggingface]`)."""
        return None

    def capacity(self) -> int | None:
        """None: Inference Providers don't say how much they run at once."""
        return None

    async def close(self) -> None:
        self._closed = True
        for client in self._clients.values():
            await client.close()
        self._clients.clear()

    async def generate(
        self, params: GenerationParams, on_event: EventCallback | None = None
    ) -> list[GeneratedImage]:
        if self._closed:
            raise BackendUnavailable("the Hugging Face backend is closed")
        hub_task = HUB_TASKS.get(params.task)
        if hub_task is None:
            raise UnsupportedTask(
                f"{TASK_NAMES.get(params.task, params.task)} is not offered by Hugging Face "
                "Inference Providers",
                "task",
            )
        if not params.prompt.strip():
            raise BackendRejected("prompt must not be empty", "prompt")
        if params.task == "img2img" and not params.image:
            raise BackendRejected("a variation needs an input image", "image")
        model = self.model if params.task == "txt2img" else self.image_to_image_model
        provider = await self._route(params.task, hub_task, model)
        client = self._clients.get(provider)
        if client is None:
            client = self._clients[provider] = AsyncInferenceClient(
                provider=provider,  # type: ignore[arg-type]  # one the lookup found in the client's table
                token=self._token,
                timeout=self.timeout_s,
            )
        await _emit(on_event, BackendEvent("started", extra={"batch_size": 1}))
        images = []
        for i, seed in enumerate(params.seeds):
            started = time.monotonic()
            try:
                async with asyncio.timeout(self.timeout_s):
                    image = await self._call(client, params, seed, model)
                png = await asyncio.to_thread(_to_png, image)
            except Exception as e:
                raise self._failure(e, params.task, provider, model) from None
            log.debug("HF %s via %s: image %d of %d in %.1f s", model, provider, i + 1, params.n,
                      time.monotonic() - started)  # fmt: skip
            images.append(GeneratedImage(png=png, seed=seed))
            # Providers report no denoising steps; images done out of images asked is the progress
            # there is (extra.unit says so, for adapters that word it differently).
            await _emit(
                on_event, BackendEvent("progress", step=i + 1, total=params.n, extra={"unit": "image"})
            )
        return images

    async def _call(
        self, client: AsyncInferenceClient, params: GenerationParams, seed: int, model: str
    ) -> Image.Image:
        common: dict[str, Any] = {
            "negative_prompt": params.negative_prompt or None,
            "num_inference_steps": params.steps,
            "guidance_scale": params.guidance,
            # A URL makes the client post there in hf-inference's format, whatever the provider.
            "model": self.base_url or model,
        }
        if params.task == "txt2img":
            return await client.text_to_image(
                params.prompt, width=params.width, height=params.height, seed=seed, **common
            )
        return await client.image_to_image(
            params.image,  # type: ignore[arg-type]  # checked in generate()
            prompt=params.prompt,
            target_size=ImageToImageTargetSize(width=params.width, height=params.height),
            seed=seed,
            strength=params.strength,
            **common,
        )

    async def _route(self, task: str, hub_task: str, model: str) -> str:
        """The provider serving `model` for `hub_task`, looked up (once) off the event loop."""
        if (provider := self._routes.get(hub_task)) is not None:
            return provider
        target = self.base_url or model
        try:
            async with asyncio.timeout(self.timeout_s):
                provider = await asyncio.to_thread(self._lookup, hub_task, target)
        except ValueError as e:
            # The client's words for "not served": no mapping, another provider, another task.
            detail = _one_line(str(e))
            log.warning("HF: %s on provider %s: %s", hub_task, self.provider, detail)
            if task == "img2img":
                raise UnsupportedTask(
                    f"variations (image-to-image) are not available here: {detail}", "task"
                ) from None
            raise BackendRejected(detail, "model") from None
        except Exception as e:
            raise self._failure(e, task, self.provider, model) from None
        self._routes[hub_task] = provider
        log.info("HF: %s for %s is served by %s", hub_task, target, provider)
        return provider

    def _lookup(self, hub_task: str, target: str) -> str:
        """In a worker thread: the provider serving `target` for `hub_task`. The client's provider
        helper fetches the model's mapping from the Hub and validates it (ValueError when not
        served); huggingface_hub caches both lookups, where the client's own calls find them."""
        provider = self.provider
        if provider == "auto" and not target.startswith(("http://", "https://")):
            provider = self._first_provider(hub_task, target)
        helper = get_provider_helper(provider, task=hub_task, model=target)  # type: ignore[arg-type]
        helper._prepare_mapping_info(target)
        return helper.provider

    def _first_provider(self, hub_task: str, model: str) -> str:
        """For provider "auto": the first provider serving `model` for this task. Asked with the
        account's token, the Hub lists them in the order set at hf.co/settings/inference-providers
        (the client's own "auto" asks anonymously, and takes the first provider whatever its task)."""
        token = self._token if self._token.startswith("hf_") else None  # a provider's key is not the Hub's
        info = HfApi(token=token).model_info(
            model, expand=["inferenceProviderMapping"], timeout=self.timeout_s
        )
        mappings = info.inference_provider_mapping or []
        for mapping in mappings:
            if mapping.task == hub_task and hub_task in PROVIDERS.get(mapping.provider, {}):
                return mapping.provider
        served = ", ".join(f"{m.provider} for {m.task}" for m in mappings) or "no provider"
        raise ValueError(f"no provider serves {model} for {hub_task} ({served})")

    def _failure(self, e: Exception, task: str, provider: str, model: str) -> BackendError:
        """What a failed call means for the dispatcher and the user; unknown errors propagate."""
        if isinstance(e, BackendError):
            return e
        log.warning("HF %s via %s failed: %s: %s", model, provider, type(e).__name__, e)
        if isinstance(e, RepositoryNotFoundError):
            return BackendRejected(f"model {model} was not found on the Hugging Face Hub", "model")
        if isinstance(e, HfHubHTTPError):
            return self._http_failure(e, task, provider, model)
        if isinstance(e, (InferenceTimeoutError, TimeoutError)):  # the client's, ours, a provider's poll
            return BackendUnavailable(f"Hugging Face ({provider}) did not answer within {self.timeout_s:g} s")
        if isinstance(e, OfflineModeIsEnabled):
            return BackendError("HF_HUB_OFFLINE is set in the bot's environment, which blocks Hugging Face")
        if isinstance(e, httpx2.HTTPError):  # connection refused, reset, DNS...
            return BackendUnavailable(f"cannot reach Hugging Face ({provider}): {type(e).__name__}")
        if isinstance(e, OSError):  # PIL: the answer was not an image
            return BackendError(f"Hugging Face ({provider}) answered with something that is not an image")
        if isinstance(e, Image.DecompressionBombError):
            return BackendError(f"Hugging Face ({provider}) answered with an image too large to open")
        if isinstance(e, (KeyError, IndexError, TypeError, ValueError)):
            return BackendError(f"Hugging Face ({provider}) sent an answer that could not be read")
        raise e

    def _http_failure(self, e: HfHubHTTPError, task: str, provider: str, model: str) -> BackendError:
        status = e.response.status_code
        detail = _provider_message(e)
        said = f": {detail}" if detail else ""
        if status == 401:
            return BackendRejected(
                f"Hugging Face did not accept the token (HTTP 401{said}); check {' or '.join(TOKEN_ENVS)}"
            )
        if status == 402:
            return BackendRejected(
                f"the Hugging Face account has no Inference Providers credits left (HTTP 402{said})"
            )
        if status == 429:
            wait = _retry_after(e.response.headers)
            if wait is not None and wait > self.retry_after_max_s:
                return BackendRejected(
                    f"Hugging Face's rate limit was reached; try again in about {describe_wait(wait)}"
                )
            return BackendUnavailable(f"rate limited by Hugging Face ({provider}){said}", retry_after_s=wait)
        if 400 <= status < 500 and (status == 451 or CONTENT_REFUSED.search(detail)):
            return BackendRejected(
                f"{provider} refused this {'prompt' if task == 'txt2img' else 'image or prompt'} "
                f"(content policy){said}",
                "prompt" if task == "txt2img" else None,
            )
        if status == 403:
            return BackendRejected(
                f"Hugging Face refused access (HTTP 403{said}); the token needs the "
                '"Make calls to Inference Providers" permission'
            )
        if status == 404 or (400 <= status < 500 and MODEL_NOT_SERVED.search(detail)):
            return BackendRejected(
                f"model {model} is not available from {provider} (HTTP {status}{said})", "model"
            )
        if status == 413:
            return BackendRejected(f"the input image is too large for {provider}", "image")
        if 400 <= status < 500:
            return BackendRejected(
                f"{provider} rejected the request (HTTP {status}{said})", _field_from_message(detail)
            )
        if status >= 500:
            return BackendUnavailable(
                f"Hugging Face ({provider}) failed (HTTP {status}{said})",
                retry_after_s=_retry_after(e.response.headers),
            )
        return BackendError(f"Hugging Face ({provider}) answered HTTP {status}{said}")


async def _emit(on_event: EventCallback | None, event: BackendEvent) -> None:
    if on_event is None:
        return
    try:
        await on_event(event)
    except Exception:
        # A failing progress display must not cost the user their image.
        log.exception("progress callback failed for event %s", event.kind)


def _to_png(image: Image.Image) -> bytes:
    image.load()  # decodes now: a truncated answer fails here, not in the adapter
    out = io.BytesIO()
    image.convert("RGBA" if image.mode in ("RGBA", "LA", "P") else "RGB").save(out, format="PNG")
    return out.getvalue()


def _provider_message(e: HfHubHTTPError) -> str:
    """The provider's own words, one line: JSON shapes differ by provider (`error`, `detail`,
    `message`), and huggingface_hub's `server_message` only knows some of them."""
    response = e.response
    try:
        text = _message_in(response.json())
    except ValueError:
        text = ""
    if not text:
        text = e.server_message or ""
    if not text and "html" not in response.headers.get("content-type", "").lower():
        text = response.text
    if "Traceback (most recent call last)" in text:
        text = [line for line in text.splitlines() if line.strip()][-1]  # the exception, not the stack
    return _one_line(text)


def _message_in(data: Any) -> str:
    if isinstance(data, str):
        return data
    if isinstance(data, list):
        return "; ".join(filter(None, map(_message_in, data)))
    if not isinstance(data, dict):
        return ""
    if "msg" in data:  # a validation error item: {"loc": [..., "field"], "msg": "..."}
        loc = data.get("loc")
        where = f"{loc[-1]}: " if isinstance(loc, list) and loc else ""
        return f"{where}{data['msg']}"
    for key in ("error", "detail", "message", "errors"):
        if data.get(key):
            return _message_in(data[key])
    return ""


def _one_line(text: str) -> str:
    # Messages are quoted inside sentences of ours: no trailing full stop of their own.
    text = " ".join(str(text).split()).rstrip(". ")
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"


def _retry_after(headers: Any) -> float | None:
    """Seconds to wait from `Retry-After` (seconds or an HTTP date), else from the router's
    `RateLimit` header when the window is used up."""
    value = (headers.get("retry-after") or "").strip()
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            pass
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            pass
    limit = parse_ratelimit_headers(headers)
    if limit is not None and limit.remaining == 0:
        return float(limit.reset_in_seconds)
    return None


def _field_from_message(message: str) -> str | None:
    lowered = message.lower()
    for fld, words in (
        ("width", ("width", "image_size")),
        ("height", ("height",)),
        ("steps", ("num_inference_steps", "steps")),
        ("guidance", ("guidance_scale", "guidance")),
        ("negative_prompt", ("negative_prompt",)),
        ("seed", ("seed",)),
        ("prompt", ("inputs", "prompt")),
    ):
        if any(w in lowered for w in words):
            return fld
    return None
