"""OpenAI Images API on the same engine as `/v1/txt2img` & co, so OpenAI-speaking tools use our server.

Routes (added by `setup(app)`, which `app.create_app` calls):

- `POST /v1/images/generations` (JSON) -> txt2img
- `POST /v1/images/edits` (multipart) -> inpaint (transparent pixels of `mask`, or of `image` when
  there is no mask, are repainted), or img2img of the whole image when nothing is transparent
- `POST /v1/images/variations` (multipart) -> img2img with an empty prompt
- `GET /v1/models`, `GET /v1/models/{id}` -> the loaded model
- `GET /images/files/{name}` -> images returned as `response_format: "url"`

`stream: true` (generations, edits) answers with OpenAI's server-sent events: up to `partial_images`
`*.partial_image` previews per image, then one `*.completed` event per image (see `stream_job`).

This module only translates: the OpenAI fields (declared, with the native extensions, in
`schemas.request_models`) become the native fields `validation.parse_generation` takes (so limits
and messages are the same as on the native API), jobs go to the app's
engine with `submit()`, so OpenAI and native requests share one queue and batch together, and errors
leave in OpenAI's shape `{"error": {"message", "type", "param", "code"}}` so the official client
raises the matching exception (`BadRequestError` with `.param`, `AuthenticationError`,
`RateLimitError` with `Retry-After`, ...).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from PIL import Image

from inference_server import keys
from inference_server.bodies import read_body
from inference_server.config import ServerConfig
from inference_server.engine import EngineError, GenerationResult, Preview, Progress, Queued, Task
from inference_server.errors import RequestError
from inference_server.families import ModelFamily
from inference_server.handling import (
    ModelChoice,
    capabilities,
    choose_model,
    counted,
    end_stream_after_error,
    refuse_if_draining,
    wait_for_result,
)
from inference_server.images import decode_base64, decode_image, encode_png
from inference_server.schemas import OUTPUT_FORMATS, SHOWN_CHARS, parse_size, request_models, show, validate
from inference_server.validation import ParsedRequest, parse_generation, unknown_field

log = logging.getLogger(__name__)

# Open (no bearer token) on purpose: tools hand the URL to a browser or download it with a plain
# GET, as they do with OpenAI's own pre-signed URLs. The name carries 192 random bits, so the URL
# itself is the credential; it lives only for `[inference_server] openai_url_ttl_s`. Outside `/v1`
# because the contract requires the token on every `/v1` route.
FILES_ROUTE = "/images/files/{name}"
FILES_PREFIX = "/images/files/"
# Requests whose errors leave in OpenAI's shape (the native API keeps its own).
OPENAI_PREFIXES = ("/v1/images/", "/v1/models")

# `url` images are kept in memory: the server has no storage of its own, and a URL is a convenience
# that lasts an hour at most. Bounded so that a burst of url requests cannot exhaust memory:
# 256 MiB holds ~170 1024x1024 PNGs or ~60,000 of the embedded model's 64x64 ones; the count bound
# keeps the bookkeeping small when images are tiny. Past either bound the oldest image goes first.
MAX_STORED_BYTES = 256 * 1024 * 1024
MAX_STORED_IMAGES = 4096

# Legacy models whose default response_format was "url"; every other model defaults to b64_json
# (GPT image models only return base64, and b64 works even when clients cannot reach the server).
URL_DEFAULT_MODELS = frozenset({"dall-e-2", "dall-e-3"})
# Native fields the OpenAI routes take as extensions (e.g. `extra_body={"seed": 1}` with the official
# client); every field, OpenAI's and these, is declared in `schemas.request_models`.
NATIVE_EXTENSIONS = (
    "negative_prompt",
    "seed",
    "steps",
    "guidance",
    "scheduler",
    "timeout_s",
    "priority",
    "true_cfg",
    "cache",
)
# HTTP status of each engine error kind as this API reports it (see `translate_error`).
ENGINE_STATUS = {"overloaded": 429, "not_ready": 503, "shutting_down": 503, "deadline_exceeded": 504}


# -- errors ----------------------------------------------------------------------------------------

_TYPES = {401: "invalid_request_error", 429: "requests"}


def openai_error(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """An error in OpenAI's JSON shape; the client picks its exception class from the status."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def translate_error(response: web.Response) -> web.Response:
    """Rewrite a native `{"error": {"code", "message", "field"}}` response into OpenAI's shape.

    The native error middleware (inside this one) has already turned exceptions, auth failures and
    router errors into native responses, so this is the single place where OpenAI's statuses and
    error types are decided.
    """
    try:
        native = json.loads(response.body)["error"]  # type: ignore[arg-type]
        code, message, field = native["code"], native["message"], native.get("field")
    except (TypeError, ValueError, KeyError):
        return response
    status = response.status
    headers = {k: v for k, v in response.headers.items() if k in ("Retry-After", "WWW-Authenticate", "Allow")}
    if status == 401:
        code = "invalid_api_key"  # what OpenAI sends for a missing or wrong key
    elif code == "overloaded":
        # Queue full: 429 is what OpenAI clients and tools back off on (RateLimitError), honouring
        # Retry-After. "not_ready" / "shutting_down" stay 503 (InternalServerError, also retried).
        status, code = 429, "rate_limit_exceeded"
    return openai_error(status, message, param=field, code=code, headers=headers)


@web.middleware
async def openai_error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    response = await handler(request)
    if (
        response.status >= 400
        and request.path.startswith(OPENAI_PREFIXES)
        and isinstance(response, web.Response)
        and response.content_type == "application/json"
    ):
        return translate_error(response)
    return response


def _bad(param: str, message: str) -> RequestError:
    return RequestError(400, "invalid_request", param, message)


# -- in-memory store for `url` responses ------------------------------------------------------------


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    content_type: str
    expires_at: float


class ImageStore:
    """Encoded images by unguessable name, each for `ttl_s`, bounded in count and bytes.

    Touched only from the event loop, so no lock. Entries are kept in insertion order, which is
    also expiry order since every entry lives `ttl_s`.
    """

    def __init__(
        self,
        ttl_s: float,
        *,
        max_images: int = MAX_STORED_IMAGES,
        max_bytes: int = MAX_STORED_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_images = max_images
        self.max_bytes = max_bytes
        self.clock = clock
        self.bytes = 0
        self._items: OrderedDict[str, StoredImage] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, data: bytes, content_type: str, extension: str) -> str:
        self._purge()
        while self._items and (
            len(self._items) >= self.max_images or self.bytes + len(data) > self.max_bytes
        ):
            name, old = self._items.popitem(last=False)
            self.bytes -= len(old.data)
            log.warning(
                "image URL store full (%d images, %d bytes): %s evicted before it expired; "
                "clients with many or large images should ask for b64_json",
                len(self._items) + 1,
                self.bytes + len(old.data),
                name,
            )
        name = f"{secrets.token_urlsafe(24)}.{extension}"  # 192 random bits: the URL is the credential
        self._items[name] = StoredImage(data, content_type, self.clock() + self.ttl_s)
        self.bytes += len(data)
        return name

    def get(self, name: str) -> StoredImage | None:
        self._purge()
        return self._items.get(name)

    def _purge(self) -> None:
        now = self.clock()
        while self._items:
            name, item = next(iter(self._items.items()))
            if item.expires_at > now:
                break
            del self._items[name]
            self.bytes -= len(item.data)


IMAGE_STORE = web.AppKey("openai_image_store", ImageStore)
STARTED_AT = web.AppKey("openai_started_at", int)  # `created` of the model in /v1/models


# -- request parsing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputOptions:
    response_format: str  # "url" | "b64_json"
    pil_format: str
    content_type: str
    extension: str
    quality: int  # encoder quality for JPEG / WebP (100 = best)
    name: str  # output_format as echoed in the response
    stream: bool = False  # answer with server-sent events (see `stream_job`)
    partial_images: int = 0  # previews per image to stream before it completes (0-3)


def _output_options(fields: Mapping[str, Any]) -> OutputOptions:
    model = fields["model"]
    default = "url" if isinstance(model, str) and model.strip().lower() in URL_DEFAULT_MODELS else "b64_json"
    name = fields["output_format"] or "png"
    pil_format, content_type, extension = OUTPUT_FORMATS[name]
    compression = fields["output_compression"]
    return OutputOptions(
        response_format=fields["response_format"] or default,
        pil_format=pil_format,
        content_type=content_type,
        extension=extension,
        quality=100 if compression is None else compression,
        name="jpeg" if name == "jpg" else name,
        stream=bool(fields["stream"]),
        partial_images=fields["partial_images"] or 0,
    )


def _native_body(
    fields: Mapping[str, Any], server: ServerConfig, family: ModelFamily, *, prompt: bool
) -> dict[str, Any]:
    """The native fields `parse_generation` takes, from the (already checked) OpenAI ones."""
    names = (*NATIVE_EXTENSIONS, "n", "strength", *(("prompt",) if prompt else ()))
    body = {name: fields[name] for name in names if fields.get(name) is not None}
    size = parse_size(fields["size"], server, family) if fields["size"] is not None else None
    if size is not None:
        body["width"], body["height"] = size
    return body


def _unknown(name: str, family: ModelFamily) -> str:
    if name == "true_cfg":
        return unknown_field(name, "this endpoint", {}, family)
    if name == "markup":
        return "markup images are not supported by this server; use mask"
    # OpenAI itself refuses unknown arguments; silently dropping one would hide a typo.
    return f"unrecognized request argument supplied: {name if len(name) <= SHOWN_CHARS else show(name)}"


def _upload(fields: Mapping[str, Any], names: tuple[str, ...], param: str) -> bytes | None:
    found = [fields[n] for n in names if fields.get(n) is not None]
    if len(found) > 1:
        raise _bad(param, f"send one {param}; this server edits one image per request")
    if not found:
        return None
    return decode_base64(found[0], param) if isinstance(found[0], str) else found[0]


def _native(
    task: Task,
    body: dict[str, Any],
    server: ServerConfig,
    family: ModelFamily,
    files: Mapping[str, bytes],
    choice: ModelChoice | None = None,
) -> ParsedRequest:
    """`parse_generation` of the native fields; its width/height come from `size` here."""
    try:
        return parse_generation(
            task,
            body,
            server=server,
            family=family,
            files=files,
            model=choice.name if choice is not None else "",
            loras=choice.loras if choice is not None else (),
        )
    except RequestError as e:
        if e.field in ("width", "height"):
            e.field = "size"
        raise


def parse_openai(
    endpoint: str,
    body: Mapping[str, Any],
    files: Mapping[str, bytes],
    *,
    from_form: bool,
    server: ServerConfig,
    family: ModelFamily,
    choice: ModelChoice | None = None,
) -> tuple[ParsedRequest, OutputOptions]:
    """Validate an OpenAI request and turn it into the native `ParsedRequest` (pure; no aiohttp).
    `choice` is the registry's reading of `model` and `loras` (`handling.choose_model`)."""
    schema = request_models(server, family).openai[endpoint]
    fields = validate(
        schema, {**body, **files}, from_form=from_form, unknown=lambda name: _unknown(name, family)
    )
    options = _output_options(fields)
    if options.stream and endpoint == "variations":
        raise _bad("stream", "variations cannot stream (OpenAI's variations endpoint has no stream field)")
    if fields["user"] is not None or fields["safety_identifier"] is not None:
        log.debug("OpenAI request for end user %r", fields["safety_identifier"] or fields["user"])

    if endpoint == "generations":
        return _native(
            "txt2img", _native_body(fields, server, family, prompt=True), server, family, {}, choice
        ), options

    image = _upload(fields, ("image", "image[]"), "image")
    if image is None:
        raise _bad("image", "image is required")

    if endpoint == "variations":
        native = _native_body(fields, server, family, prompt=False)
        native["prompt"] = "variation"  # placeholder: parse_generation requires one; replaced below
        parsed = _native("img2img", native, server, family, {"image": image}, choice)
        # No prompt: the model varies the picture unconditioned, which is what a variation is.
        return dataclasses.replace(
            parsed, request=dataclasses.replace(parsed.request, prompt=fields["prompt"])
        ), options

    # Edits: OpenAI marks the area to repaint with fully transparent pixels, of the mask or else of
    # the image itself; the native API wants white = repaint. A mask without any alpha is refused
    # rather than guessed at (is white "edit" or "keep"?).
    native = _native_body(fields, server, family, prompt=True)
    mask_upload = _upload(fields, ("mask",), "mask")
    source = mask_upload if mask_upload is not None else image
    param = "mask" if mask_upload is not None else "image"
    repaint = transparent_area(decode_image(source, param, max_pixels=server.max_image_pixels))
    if mask_upload is not None and repaint is None:
        raise _bad("mask", "mask has no alpha channel: its fully transparent pixels must mark where to edit")
    if mask_upload is not None and repaint is not None and repaint.getbbox() is None:
        raise _bad("mask", "mask has no fully transparent pixels, so there is nothing to edit")
    if repaint is None or repaint.getbbox() is None:
        # No mask and no transparent pixel in the image (RGB, or RGBA fully opaque): edit the whole
        # picture (image-to-image), as GPT image models do.
        return _native("img2img", native, server, family, {"image": image}, choice), options
    native.setdefault("strength", 1.0)  # the transparent area is repainted from scratch
    parsed = _native("inpaint", native, server, family, {"image": image, "mask": encode_png(repaint)}, choice)
    return parsed, options


def transparent_area(img: Image.Image) -> Image.Image | None:
    """An L mask, 255 where `img` is fully transparent; None when `img` has no alpha at all."""
    if img.mode not in ("RGBA", "LA", "PA", "La", "RGBa") and "transparency" not in img.info:
        return None
    alpha = img.convert("RGBA").getchannel("A")
    return alpha.point(lambda a: 255 if a == 0 else 0)


# -- running ---------------------------------------------------------------------------------------


async def run_job(request: web.Request, parsed: ParsedRequest) -> GenerationResult:
    """Submit to the app's engine (shared with the native routes) and wait, dropping the job if the
    client goes away."""
    refuse_if_draining(request.app)
    job = request.app[keys.ENGINE].submit(parsed.request, timeout_s=parsed.timeout_s)
    return await wait_for_result(request, job, f"OpenAI {parsed.request.task}")


def encode_image(img: Image.Image, options: OutputOptions) -> bytes:
    if options.pil_format == "PNG":
        return encode_png(img)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format=options.pil_format, quality=options.quality)
    return buf.getvalue()


def public_base(request: web.Request) -> str | None:
    """What goes in front of `/images/files/<name>` in a link: `[inference_server] public_url`, else
    the address the client's connection arrived on (the server's own socket). Never the Host header:
    any client sets it, so links built from it point wherever a client likes (and an HTTP/1.0
    request without one gets a link without the port). None when neither is known (a Unix socket)."""
    configured = request.app[keys.CONFIG].server.public_url
    if configured:
        return configured.rstrip("/")
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if not isinstance(sockname, tuple) or len(sockname) < 2:
        return None
    host, port = sockname[0], sockname[1]
    return f"{request.scheme}://{f'[{host}]' if ':' in host else host}:{port}"


async def _respond(
    request: web.Request, result: GenerationResult, options: OutputOptions, base: str | None
) -> web.Response:
    encoded = await asyncio.to_thread(lambda: [encode_image(img, options) for img in result.images])
    data: list[dict[str, Any]] = []
    if options.response_format == "url":
        assert base is not None, "checked before the job was submitted"
        store = request.app[IMAGE_STORE]
        for blob in encoded:
            name = store.put(blob, options.content_type, options.extension)
            data.append({"url": f"{base}{FILES_PREFIX}{name}"})
    else:
        data = [{"b64_json": base64.b64encode(blob).decode("ascii")} for blob in encoded]
    body = {
        "created": int(time.time()),
        "data": data,
        "output_format": options.name,
        "size": f"{result.width}x{result.height}",
    }
    return web.json_response(body)


_INTERNAL_MESSAGE = "internal server error (see the server log)"


def _sse_error(message: str, code: str) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"message": message, "type": "server_error", "param": None, "code": code},
    }


def _sse(data: Mapping[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()


async def stream_job(
    request: web.Request, parsed: ParsedRequest, options: OutputOptions, endpoint: str
) -> web.StreamResponse:
    """`stream: true`: server-sent events as OpenAI sends them, one `*.completed` event per image.

    With `partial_images` = k, each image gets up to k `*.partial_image` events (the engine's cheap
    previews, PNG, longest side 256; fewer when the request has too few steps, as OpenAI allows),
    numbered 0..k-1 per image by `partial_image_index`. While the request waits and runs,
    SSE comment lines (ignored by clients) report the queue position and the steps, which also
    keeps proxies from closing an idle connection. Admission errors (full queue, bad fields) are
    still plain JSON errors; after the 200, an error travels as an `error` event.
    """
    app = request.app
    refuse_if_draining(app)
    interval = app[keys.CONFIG].server.progress_interval_s
    events: asyncio.Queue[Any] = asyncio.Queue()
    done = object()
    job = app[keys.ENGINE].submit(parsed.request, timeout_s=parsed.timeout_s, on_event=events.put_nowait)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    waiter = asyncio.ensure_future(job.wait())
    waiter.add_done_callback(lambda _: events.put_nowait(done))
    kind = "image_generation" if endpoint == "generations" else "image_edit"
    last_progress = 0.0
    partials_sent: dict[int, int] = {}  # image index -> partial images sent
    req = parsed.request
    try:
        await response.prepare(request)
        while (event := await events.get()) is not done:
            if isinstance(event, Preview):
                sent = partials_sent.get(event.index, 0)
                if sent < options.partial_images:
                    partials_sent[event.index] = sent + 1
                    partial = {
                        "type": f"{kind}.partial_image",
                        "b64_json": base64.b64encode(event.png).decode("ascii"),
                        "background": "opaque",
                        "created_at": int(time.time()),
                        "output_format": "png",  # previews are PNG whatever the final format
                        "partial_image_index": sent,
                        "quality": "auto",
                        "size": f"{req.width}x{req.height}",
                    }
                    await response.write(_sse(partial, f"{kind}.partial_image"))
            if isinstance(event, Progress):
                now = time.monotonic()
                if event.step < event.total and now - last_progress < interval:
                    continue
                last_progress = now
                await response.write(f": step {event.step}/{event.total}\n\n".encode())
            elif isinstance(event, Queued):
                await response.write(f": queued, position {event.position}\n\n".encode())
        if waiter.cancelled():
            raise asyncio.CancelledError
        error = waiter.exception()
        if error is None:
            result = waiter.result()
            encoded = await asyncio.to_thread(lambda: [encode_image(img, options) for img in result.images])
            for blob in encoded:
                completed = {
                    "type": f"{kind}.completed",
                    "b64_json": base64.b64encode(blob).decode("ascii"),
                    "background": "opaque",
                    "created_at": int(time.time()),
                    "output_format": options.name,
                    "quality": "auto",
                    "size": f"{result.width}x{result.height}",
                    "usage": _NO_USAGE,
                }
                await response.write(_sse(completed, f"{kind}.completed"))
        else:
            if isinstance(error, EngineError):
                app[keys.METRICS].errors.labels(error.kind).inc()
                message, code = error.message, error.kind
            else:
                log.error("streamed OpenAI request failed", exc_info=error)
                message, code = _INTERNAL_MESSAGE, "internal"
            await response.write(_sse(_sse_error(message, code), "error"))
        await response.write_eof()
    except ConnectionError:
        log.info("streaming client went away; dropping its OpenAI request")
        job.cancel()
    except Exception as e:
        job.cancel()
        await end_stream_after_error(response, e, _sse(_sse_error(_INTERNAL_MESSAGE, "internal"), "error"))
    finally:
        if not waiter.done():
            waiter.cancel()
    return response


# Token counts mean nothing for a diffusion model; the client's event type requires the object.
_NO_USAGE = {
    "input_tokens": 0,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    "output_tokens": 0,
    "total_tokens": 0,
}


async def _handle(request: web.Request, endpoint: str) -> web.StreamResponse:
    config = request.app[keys.CONFIG]
    body, files, from_form = await read_body(request)
    choice = await choose_model(request.app, body, from_form=from_form, openai=True)

    def parse() -> tuple[ParsedRequest, OutputOptions]:
        return parse_openai(
            endpoint,
            body,
            files,
            from_form=from_form,
            server=config.server,
            family=choice.family,
            choice=choice,
        )

    # Decoding uploads is CPU work: keep it off the event loop.
    parsed, options = await asyncio.to_thread(parse) if files or endpoint != "generations" else parse()
    if options.stream:
        if options.partial_images:
            # k evenly spaced previews before the last step: every ceil(steps / (k + 1)) steps.
            every = -(-parsed.request.steps // (options.partial_images + 1))
            parsed = dataclasses.replace(
                parsed, request=dataclasses.replace(parsed.request, preview_every=every)
            )
        return await stream_job(request, parsed, options, endpoint)
    base = public_base(request) if options.response_format == "url" else None
    if options.response_format == "url" and base is None:
        raise _bad(
            "response_format",
            "this server can't tell the address clients reach it at; ask for b64_json, or set "
            "[inference_server] public_url",
        )
    result = await run_job(request, parsed)
    return await _respond(request, result, options, base)


def make_handler(endpoint: str) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await counted(request, f"openai_{endpoint}", lambda: _handle(request, endpoint), ENGINE_STATUS)

    handler.__name__ = f"openai_{endpoint}"
    return handler


# -- models and files ------------------------------------------------------------------------------


def model_id(app: web.Application) -> str:
    """The default model's name, as `/health` shows it (no file-system path: `public_model_name`)."""
    return app[keys.REGISTRY].default_name


def model_json(app: web.Application, name: str) -> dict[str, Any]:
    """One model as `/v1/models` lists it: OpenAI's fields, then ours (OpenAI clients ignore them)."""
    registry = app[keys.REGISTRY]
    family = registry.family(name) if name != registry.default_name else app[keys.ENGINE].info.family
    return {
        "id": name,
        "object": "model",
        "created": app[STARTED_AT],
        "owned_by": "imagine",
        "default": name == registry.default_name,
        "loaded": registry.is_loaded(name) if name != registry.default_name else app[keys.ENGINE].ready,
        # Read from the model's config files until it has been loaded (null if they don't say).
        "family": family.name if family is not None else registry.family_name(name),
        "capabilities": capabilities(app, name),
        "loras": registry.lora_names(name),
    }


async def list_models(request: web.Request) -> web.Response:
    names = request.app[keys.REGISTRY].names
    return web.json_response({"object": "list", "data": [model_json(request.app, name) for name in names]})


async def get_model(request: web.Request) -> web.Response:
    wanted = request.match_info["model"]
    registry = request.app[keys.REGISTRY]
    if wanted not in registry.names:
        raise RequestError(
            404,
            "model_not_found",
            "model",
            f"the model {wanted[:64]!r} does not exist; this server has: {', '.join(registry.names)}",
        )
    return web.json_response(model_json(request.app, wanted))


async def get_file(request: web.Request) -> web.Response:
    item = request.app[IMAGE_STORE].get(request.match_info["name"])
    if item is None:
        raise web.HTTPNotFound(reason="no such image (the URL is wrong or has expired)")
    remaining = max(int(item.expires_at - request.app[IMAGE_STORE].clock()), 0)
    return web.Response(
        body=item.data,
        content_type=item.content_type,
        headers={"Cache-Control": f"private, max-age={remaining}", "X-Content-Type-Options": "nosniff"},
    )


def setup(app: web.Application) -> None:
    """Register the OpenAI-compatible routes and the error translation on an app from `create_app`."""
    app[IMAGE_STORE] = ImageStore(app[keys.CONFIG].server.openai_url_ttl_s)
    app[STARTED_AT] = int(time.time())
    # Outermost, so it sees the native error responses of the error and auth middlewares.
    app.middlewares.insert(0, openai_error_middleware)
    app.router.add_post("/v1/images/generations", make_handler("generations"))
    app.router.add_post("/v1/images/edits", make_handler("edits"))
    app.router.add_post("/v1/images/variations", make_handler("variations"))
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_get(FILES_ROUTE, get_file)


__all__ = ["setup", "parse_openai", "parse_size", "ImageStore", "translate_error", "transparent_area"]
