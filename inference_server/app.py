"""The aiohttp application: routes, auth, error mapping, streaming. Wired in `create_app`."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from inference_server import keys
from inference_server.batcher import DynamicBatchingEngine
from inference_server.bodies import read_body
from inference_server.config import Config
from inference_server.config_loader import ConfigError
from inference_server.engine import Engine, EngineError, GenerationResult, Job, Progress, ShuttingDown, Task
from inference_server.errors import RequestError
from inference_server.images import png_base64
from inference_server.metrics import Metrics
from inference_server.pipelines import PipelineRunner
from inference_server.validation import TASKS, ParsedRequest, parse_generation

log = logging.getLogger(__name__)

TOKEN_ENV = "INFERENCE_API_TOKEN"
OPENAPI_PATH = Path(__file__).resolve().parent / "openapi.yaml"
NDJSON = "application/x-ndjson"
# How often a waiting non-streaming handler checks whether its client is still connected.
DISCONNECT_POLL_S = 0.25

CLIENT_CLOSED = 499  # nginx's "client closed request", for metrics and the access log


class ClientGone(Exception):
    """The client disconnected while its request waited."""


# HTTP status for each engine error kind (see CONTRACTS.md).
_ENGINE_STATUS = {
    "overloaded": 503,
    "not_ready": 503,
    "shutting_down": 503,
    "deadline_exceeded": 504,
    "out_of_memory": 500,
    "generation_failed": 500,
    "internal": 500,
}
_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def error_response(
    status: int, code: str, message: str, field: str | None = None, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message, "field": field}}, status=status, headers=headers
    )


def engine_error_response(e: EngineError) -> web.Response:
    headers = {"Retry-After": str(e.retry_after_s)} if e.retry_after_s else None
    return error_response(_ENGINE_STATUS.get(e.kind, 500), e.kind, e.message, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every error leaves as the contract's JSON body; tracebacks go to the log only.

    Handlers that stream (NDJSON, server-sent events) catch their own errors once the 200 has gone
    out (see `end_stream_after_error`): after the headers, an error can only travel as an event.
    """
    try:
        return await handler(request)
    except RequestError as e:
        response = error_response(e.status, e.code, e.message, e.field)
        if e.status in (408, 413):
            # The rest of the body may still be on its way (or never come): don't read it, close.
            response.force_close()
        return response
    except EngineError as e:
        return engine_error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        headers = {k: v for k, v in e.headers.items() if k in ("Allow", "Retry-After")}
        message = (
            e.reason
            if e.status != 413
            else f"the request body is larger than {request.app[keys.CONFIG].server.max_body_bytes} bytes"
        )
        return error_response(e.status, _HTTP_CODES.get(e.status, "error"), message, headers=headers)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal", "internal server error (see the server log)")


@web.middleware
async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    token = request.app[keys.API_TOKEN]
    if token and request.path.startswith("/v1/"):
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        # aiohttp decodes header bytes that aren't UTF-8 as surrogates; "surrogatepass" encodes any
        # str, so such a header is a wrong token (401), not an encoding error (500).
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("utf-8", "surrogatepass"), token.encode("utf-8", "surrogatepass")
        ):
            return error_response(
                401, "unauthorized", "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
            )
    return await handler(request)


# -- generation ----------------------------------------------------------------------------------


# PNG-encoding this many pixels takes about a millisecond: less than the hop to a worker thread and
# back (which also contends for the GIL with the pipeline thread), so small results encode inline.
INLINE_ENCODE_PIXELS = 128 * 128


async def result_payload(result: GenerationResult) -> dict[str, Any]:
    """`result_json`, off the event loop unless the images are small."""
    if result.width * result.height * len(result.images) <= INLINE_ENCODE_PIXELS:
        return result_json(result)
    return await asyncio.to_thread(result_json, result)


def result_json(result: GenerationResult) -> dict[str, Any]:
    return {
        "images": [
            {"png_base64": png_base64(img), "seed": seed}
            for img, seed in zip(result.images, result.seeds, strict=True)
        ],
        "width": result.width,
        "height": result.height,
        "steps": result.steps,
        "model": result.model,
        "timings": {
            "queue_s": round(result.queue_s, 4),
            "run_s": round(result.run_s, 4),
            "total_s": round(result.total_s, 4),
        },
        "batch_size": result.batch_size,
    }


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def parse_request(request: web.Request, task: Task) -> ParsedRequest:
    config = request.app[keys.CONFIG]
    body, files, from_form = await read_body(request)

    def parse() -> ParsedRequest:
        return parse_generation(
            task, body, server=config.server, model=config.model, files=files, from_form=from_form
        )

    # Image decoding and resizing are CPU work: keep them off the event loop.
    return await asyncio.to_thread(parse) if task != "txt2img" else parse()


async def counted(
    request: web.Request,
    label: str,
    work: Callable[[], Awaitable[web.StreamResponse]],
    engine_status: Mapping[str, int] | None = None,
) -> web.StreamResponse:
    """Run a generation handler's `work`, counting its outcome in the request and error metrics.

    Every generation route (native and OpenAI) goes through here, so status labels and error kinds
    are counted the same way whichever API a client speaks. `engine_status` maps engine error kinds
    to the HTTP status that API answers with (OpenAI's answers a full queue with 429, ours with 503).
    """
    statuses = _ENGINE_STATUS if engine_status is None else engine_status
    metrics = request.app[keys.METRICS]
    status = 500
    try:
        response = await work()
        status = response.status
        return response
    except RequestError as e:
        status = e.status
        metrics.errors.labels(e.code).inc()
        raise
    except EngineError as e:
        status = statuses.get(e.kind, 500)
        metrics.errors.labels(e.kind).inc()
        raise
    except ClientGone:
        status = CLIENT_CLOSED
        metrics.errors.labels("client_gone").inc()
        return web.Response(status=CLIENT_CLOSED)  # nobody reads it; keeps aiohttp's bookkeeping tidy
    except asyncio.CancelledError:  # aiohttp cancelled the handler: the client went away
        status = CLIENT_CLOSED
        metrics.errors.labels("client_gone").inc()
        raise
    finally:
        metrics.requests.labels(label, str(status)).inc()


def make_generate_handler(task: Task) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await counted(request, task, lambda: _generate(request, task))

    handler.__name__ = f"generate_{task}"
    return handler


async def _generate(request: web.Request, task: Task) -> web.StreamResponse:
    app = request.app
    if app[keys.STATE].draining:
        raise ShuttingDown(
            "the server is shutting down", retry_after_s=app[keys.CONFIG].batching.retry_after_s
        )
    parsed = await parse_request(request, task)
    stream = parsed.stream or NDJSON in request.headers.get("Accept", "")
    engine = app[keys.ENGINE]
    if stream:
        return await _stream(request, engine, parsed)
    job = engine.submit(parsed.request, timeout_s=parsed.timeout_s)
    waiter = asyncio.ensure_future(job.wait())
    try:
        while not waiter.done():
            await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S)
            if not waiter.done() and _client_gone(request):
                log.info("client went away; dropping its %s request", task)
                job.cancel()
                raise ClientGone()
        result = waiter.result()
    finally:
        if not waiter.done():
            waiter.cancel()  # handler cancelled: job.wait() cancels the job
    payload = await result_payload(result)
    return web.json_response(payload)


async def _stream(request: web.Request, engine: Engine, parsed: ParsedRequest) -> web.StreamResponse:
    interval = request.app[keys.CONFIG].server.progress_interval_s
    events: asyncio.Queue[Any] = asyncio.Queue()
    done = object()
    job: Job = engine.submit(parsed.request, timeout_s=parsed.timeout_s, on_event=events.put_nowait)
    # Admission succeeded: from here on errors travel as an "error" event inside a 200 stream.
    response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-cache"})
    waiter = asyncio.ensure_future(job.wait())
    waiter.add_done_callback(lambda _: events.put_nowait(done))
    last_progress = 0.0
    try:
        await response.prepare(request)
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL_S)
            except TimeoutError:
                if _client_gone(request):
                    raise ConnectionResetError("client went away") from None
                continue
            if event is done:
                break
            if isinstance(event, Progress):
                now = time.monotonic()
                if event.step < event.total and now - last_progress < interval:
                    continue  # throttled: a chat message can't be edited many times a second
                last_progress = now
            await response.write((json.dumps(event.to_json()) + "\n").encode())
        if waiter.cancelled():
            raise asyncio.CancelledError
        error = waiter.exception()
        if error is None:
            payload = await result_payload(waiter.result())
            line = {"event": "result", **payload}
        elif isinstance(error, EngineError):
            request.app[keys.METRICS].errors.labels(error.kind).inc()
            line = {"event": "error", "error": {"code": error.kind, "message": error.message, "field": None}}
        else:
            log.error("streamed request failed", exc_info=error)
            line = _NDJSON_INTERNAL
        await response.write((json.dumps(line) + "\n").encode())
        await response.write_eof()
    except ConnectionError:
        log.info("streaming client went away; dropping its request")
        job.cancel()
    except Exception as e:
        job.cancel()
        await end_stream_after_error(response, e, (json.dumps(_NDJSON_INTERNAL) + "\n").encode())
    finally:
        if not waiter.done():
            waiter.cancel()
    return response


_NDJSON_INTERNAL = {
    "event": "error",
    "error": {"code": "internal", "message": "internal error", "field": None},
}


async def end_stream_after_error(response: web.StreamResponse, error: Exception, last_event: bytes) -> None:
    """An unexpected error in a streaming handler: before the 200 it is the error middleware's (a
    logged 500); after it, the client gets `last_event` and the end of the stream, the log the rest."""
    if not response.prepared:
        raise error
    log.error("streamed request failed after its response started", exc_info=error)
    with contextlib.suppress(Exception):
        await response.write(last_event)
        await response.write_eof()


# -- open endpoints --------------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    engine = request.app[keys.ENGINE]
    info = engine.info
    body = {
        "status": "stopping" if request.app[keys.STATE].draining else engine.state,
        "device": info.device,
        "dtype": info.dtype,
        "model": info.model,
        "attention": info.attention,
        "queue_depth": engine.queue_depth,
        "engine": engine.name,
        "max_batch_size": engine.max_batch_size,
    }
    return web.json_response(body)


async def ready(request: web.Request) -> web.Response:
    engine = request.app[keys.ENGINE]
    if engine.ready and not request.app[keys.STATE].draining:
        return web.json_response({"ready": True})
    return web.json_response({"ready": False, "status": engine.state}, status=503)


async def metrics_handler(request: web.Request) -> web.Response:
    body, content_type = request.app[keys.METRICS].exposition(request.headers.get("Accept"))
    return web.Response(
        body=body, headers={"Content-Type": content_type, "X-Content-Type-Options": "nosniff"}
    )


async def openapi(request: web.Request) -> web.Response:
    return web.Response(
        text=await asyncio.to_thread(OPENAPI_PATH.read_text, "utf-8"), content_type="application/yaml"
    )


# -- wiring ----------------------------------------------------------------------------------------


def build_engine(config: Config, metrics: Metrics) -> Engine:
    runner = PipelineRunner(config.model)
    if config.batching.engine == "continuous":
        try:
            continuous = importlib.import_module("inference_server.continuous")
        except ModuleNotFoundError as e:
            raise ConfigError(
                '[batching] engine = "continuous" but inference_server/continuous.py is missing'
            ) from e
        return continuous.build_engine(config, runner, metrics)
    return DynamicBatchingEngine(runner, config.batching, metrics)


def _api_token(config: Config, explicit: str | None) -> str:
    token = explicit if explicit is not None else os.environ.get(TOKEN_ENV, "")
    if token:
        if not all("!" <= c <= "~" for c in token):
            # Clients send it in an HTTP header: spaces, control and non-ASCII characters don't survive.
            raise ConfigError(f"{TOKEN_ENV} must be printable ASCII without spaces")
        return token
    if config.server.allow_no_auth:
        log.warning(
            "%s is not set and allow_no_auth = true: /v1 is open to anyone who can connect", TOKEN_ENV
        )
        return ""
    raise ConfigError(
        f"set {TOKEN_ENV} (in the environment or .env) to the bearer token clients must send; "
        "for local development only, [inference_server] allow_no_auth = true disables auth"
    )


# The `Server` header of every response. aiohttp's default names the Python and aiohttp versions,
# which helps nobody but someone matching servers against lists of known vulnerabilities.
SERVER_HEADER = "imagine-inference"


async def _set_server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER_HEADER


def _hide_server_version() -> None:
    """Responses aiohttp makes before any app sees the request (a malformed request line, headers
    over the size limits) skip `on_response_prepare` and take aiohttp's default `Server` value, a
    module constant read when the response is prepared. Replace it: this process serves only this
    app. `tests/server/test_hardening.py` checks such a response, so an aiohttp change shows there."""
    from aiohttp import web_response

    web_response.SERVER_SOFTWARE = SERVER_HEADER


def runner_options(config: Config) -> dict[str, Any]:
    """Keyword arguments of `web.run_app` / `web.AppRunner` that come from the config (the tests'
    runner uses them too, so they test what `python -m inference_server` runs)."""
    return {
        # aiohttp closes a connection that hasn't delivered a complete request header this long
        # after connecting or after its previous response: slow-header (slowloris) clients and idle
        # keep-alive connections both go. The body has its own deadline (`read_body`).
        "keepalive_timeout": config.server.header_timeout_s,
        # In-flight requests get the grace period to finish after SIGTERM; the engine drains its queue.
        "shutdown_timeout": config.server.shutdown_grace_s,
        # Cancel a handler when its client disconnects, so its queued job is dropped before compute.
        "handler_cancellation": True,
    }


def create_app(
    config: Config, *, engine: Engine | None = None, api_token: str | None = None
) -> web.Application:
    """The server app. The engine starts in `cleanup_ctx`; model loading continues in the background
    and `/ready` answers 200 once the pipelines are loaded and warmed."""
    app = web.Application(
        client_max_size=config.server.max_body_bytes, middlewares=[error_middleware, auth_middleware]
    )
    metrics = Metrics()
    app[keys.CONFIG] = config
    app[keys.METRICS] = metrics
    app[keys.STATE] = keys.ServerState()
    app[keys.API_TOKEN] = _api_token(config, api_token)
    app[keys.ENGINE] = engine or build_engine(config, metrics)
    metrics.gauge(
        "inference_queue_depth", "Requests waiting for a batch.", lambda: app[keys.ENGINE].queue_depth
    )
    metrics.gauge(
        "inference_ready", "1 once the model is loaded and warmed.", lambda: float(app[keys.ENGINE].ready)
    )

    _hide_server_version()
    app.on_response_prepare.append(_set_server_header)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/openapi.yaml", openapi)
    for task in TASKS:
        app.router.add_post(f"/v1/{task}", make_generate_handler(task))
    _add_extensions(app)
    app.cleanup_ctx.append(_engine_lifecycle)
    app.on_shutdown.append(_start_draining)
    return app


def _add_extensions(app: web.Application) -> None:
    """Optional route modules of this package (the OpenAI-compatible API) add themselves here."""
    try:
        module = importlib.import_module("inference_server.openai_api")
    except ModuleNotFoundError as e:
        if e.name != "inference_server.openai_api":
            raise
        return
    module.setup(app)


async def _start_draining(app: web.Application) -> None:
    app[keys.STATE].draining = True
    engine = app[keys.ENGINE]
    log.info("shutting down: refusing new requests; %d queued", engine.queue_depth)


async def _engine_lifecycle(app: web.Application) -> AsyncIterator[None]:
    engine = app[keys.ENGINE]
    await engine.start()

    async def watch_load() -> None:
        try:
            await engine.wait_ready()
        except Exception as e:
            on_fatal = app.get(keys.ON_FATAL)
            if on_fatal is not None:
                on_fatal(e)

    watcher = asyncio.create_task(watch_load(), name="watch-model-load")
    yield
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    await engine.stop(app[keys.CONFIG].server.shutdown_grace_s)


__all__ = [
    "create_app",
    "build_engine",
    "runner_options",
    "read_body",
    "error_response",
    "engine_error_response",
    "end_stream_after_error",
]
