"""The aiohttp application: the native `/v1/<task>` routes, the open endpoints, and `create_app`,
which wires them with the OpenAI-compatible routes, the middlewares and the engine."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from inference_server import keys, openai_api
from inference_server.batcher import DynamicBatchingEngine
from inference_server.bodies import read_body
from inference_server.config import Config
from inference_server.config_loader import ConfigError
from inference_server.continuous import ContinuousBatchingEngine
from inference_server.engine import TASKS, Engine, EngineError, GenerationResult, Job, Progress, Task
from inference_server.handling import (
    DISCONNECT_POLL_S,
    auth_middleware,
    capabilities,
    choose_model,
    client_gone,
    counted,
    end_stream_after_error,
    error_middleware,
    refuse_if_draining,
    wait_for_result,
)
from inference_server.images import png_base64
from inference_server.metrics import Metrics
from inference_server.openapi import openapi_document
from inference_server.registry import ModelRegistry
from inference_server.routing import ModelRoutingEngine
from inference_server.validation import ParsedRequest, parse_generation

log = logging.getLogger(__name__)

TOKEN_ENV = "INFERENCE_API_TOKEN"
NDJSON = "application/x-ndjson"


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


async def parse_request(request: web.Request, task: Task) -> ParsedRequest:
    config = request.app[keys.CONFIG]
    body, files, from_form = await read_body(request)
    choice = await choose_model(request.app, body, from_form=from_form)

    def parse() -> ParsedRequest:
        return parse_generation(
            task,
            body,
            server=config.server,
            family=choice.family,
            files=files,
            from_form=from_form,
            model=choice.name,
            loras=choice.loras,
        )

    # Image decoding and resizing are CPU work: keep them off the event loop.
    return await asyncio.to_thread(parse) if task != "txt2img" else parse()


def make_generate_handler(task: Task) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await counted(request, task, lambda: _generate(request, task))

    handler.__name__ = f"generate_{task}"
    return handler


async def _generate(request: web.Request, task: Task) -> web.StreamResponse:
    refuse_if_draining(request.app)
    parsed = await parse_request(request, task)
    engine = request.app[keys.ENGINE]
    if parsed.stream or NDJSON in request.headers.get("Accept", ""):
        return await _stream(request, engine, parsed)
    job = engine.submit(parsed.request, timeout_s=parsed.timeout_s)
    result = await wait_for_result(request, job, task)
    return web.json_response(await result_payload(result))


async def _stream(request: web.Request, engine: Engine, parsed: ParsedRequest) -> web.StreamResponse:
    interval = request.app[keys.CONFIG].server.progress_interval_s
    events: asyncio.Queue[Any] = asyncio.Queue()
    done = object()
    every = request.app[keys.CONFIG].server.preview_every_steps
    submitted = dataclasses.replace(parsed.request, preview_every=every)
    job: Job = engine.submit(submitted, timeout_s=parsed.timeout_s, on_event=events.put_nowait)
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
                if client_gone(request):
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
        # What a router in front of several servers balances on (also in every response's headers).
        "load": engine.load.to_json(),
        # What the default model accepts and defaults to (null while it loads); the bot adapts to it.
        "capabilities": capabilities(request.app),
        # The registry: every model a request may name (`model`), and the one it gets without.
        "models": request.app[keys.REGISTRY].names,
        "default_model": request.app[keys.REGISTRY].default_name,
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
    """The OpenAPI document, generated from the request models with this server's limits."""
    family = request.app[keys.ENGINE].info.family
    return web.Response(
        text=openapi_document(request.app[keys.CONFIG].server, family), content_type="application/yaml"
    )


# -- wiring ----------------------------------------------------------------------------------------


def build_engine(config: Config, metrics: Metrics, registry: ModelRegistry) -> Engine:
    """The request-level engine over the model registry; or the continuous engine for the default
    model, with requests for other models or with LoRAs routed to a request-level one (`routing.py`)."""
    # The registry has the runner interface the request-level engine uses (load, run, info, close).
    request_level = DynamicBatchingEngine(registry, config.batching, metrics)  # type: ignore[arg-type]
    if config.batching.engine == "continuous":
        primary = ContinuousBatchingEngine(registry.default_runner, config.batching, metrics)
        return ModelRoutingEngine(primary, request_level, registry)
    return request_level


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
    # The engine's load on every response (docs/inference-server.md, "Load"): a bot routing over
    # several servers learns it for free with each answer, without polling /health.
    load = request.app[keys.ENGINE].load
    response.headers["X-Queue-Depth"] = str(load.queued)
    response.headers["X-Running"] = str(load.running)
    response.headers["X-Max-Batch"] = str(load.capacity)


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
    registry = ModelRegistry(config, metrics, exclusive_default=config.batching.engine == "continuous")
    app[keys.REGISTRY] = registry
    app[keys.ENGINE] = engine or build_engine(config, metrics, registry)
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
    openai_api.setup(app)
    app.cleanup_ctx.append(_engine_lifecycle)
    app.on_shutdown.append(_start_draining)
    return app


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


__all__ = ["create_app", "build_engine", "runner_options"]
