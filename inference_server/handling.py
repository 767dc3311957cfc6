"""What every route shares: error responses and the middlewares that make them, counting each
generation request's outcome, waiting for a job while watching its client, and ending a stream that
failed after its 200. Used by the native routes (`app.py`) and the OpenAI-compatible ones."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from inference_server import keys
from inference_server.engine import EngineError, GenerationResult, Job, NotReady, ShuttingDown
from inference_server.errors import RequestError
from inference_server.families import ModelFamily
from inference_server.limits import MAX_GUIDANCE
from inference_server.schemas import side_bounds

log = logging.getLogger(__name__)

# How often a waiting non-streaming handler checks whether its client is still connected.
DISCONNECT_POLL_S = 0.25

CLIENT_CLOSED = 499  # nginx's "client closed request", for metrics and the access log


class ClientGone(Exception):
    """The client disconnected while its request waited."""


# HTTP status of each engine error kind on the native API (the OpenAI routes answer a full
# queue with 429 instead: `openai_api.ENGINE_STATUS`).
ENGINE_STATUS = {
    "overloaded": 503,
    "not_ready": 503,
    "shutting_down": 503,
    "deadline_exceeded": 504,
    "out_of_memory": 500,
    "generation_failed": 500,
    "internal": 500,
}
HTTP_CODES = {
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
    return error_response(ENGINE_STATUS.get(e.kind, 500), e.kind, e.message, headers=headers)


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
        return error_response(e.status, HTTP_CODES.get(e.status, "error"), message, headers=headers)
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


def refuse_if_draining(app: web.Application) -> None:
    """New generation work gets a 503 once shutdown started (the queued work still finishes)."""
    if app[keys.STATE].draining:
        raise ShuttingDown(
            "the server is shutting down", retry_after_s=app[keys.CONFIG].batching.retry_after_s
        )


def loaded_family(app: web.Application) -> ModelFamily:
    """The loaded model's family, which every request is validated against; 503 while it loads
    (as the engine would answer) or after loading failed."""
    engine = app[keys.ENGINE]
    family = engine.info.family
    if family is None:
        raise NotReady(f"the model is {engine.state}", retry_after_s=app[keys.CONFIG].batching.retry_after_s)
    return family


# OpenAI's image models: a client written for OpenAI sends one of these, meaning "the model".
OPENAI_MODEL_PREFIXES = ("dall-e-", "gpt-image-")


@dataclass(frozen=True)
class ModelChoice:
    """The model a request names (the registry's name), its family and the request's LoRAs."""

    name: str
    family: ModelFamily
    loras: tuple[tuple[str, float], ...]


async def choose_model(
    app: web.Application, body: Mapping[str, Any], *, from_form: bool, openai: bool = False
) -> ModelChoice:
    """Read a request's `model` and `loras` against the registry: a 400 naming the field for an
    unknown model or a LoRA that is unknown, doesn't fit the model or has a weight out of range;
    503 while the default model loads. A model that isn't loaded yet is loaded here (its family
    is what the rest of the request is checked against)."""
    registry = app[keys.REGISTRY]
    value = body.get("model")
    if value == "" or (openai and isinstance(value, str) and value.lower().startswith(OPENAI_MODEL_PREFIXES)):
        value = None
    name = registry.resolve(value)
    if name == registry.default_name:
        family = loaded_family(app)
    else:
        family = await registry.family_for(name)
    loras = registry.loras.check(
        body.get("loras"),
        model=name,
        target=registry.target(name),
        limit=registry.settings.max_loras_per_request,
        from_form=from_form,
    )
    return ModelChoice(name=name, family=family, loras=loras)


def capabilities(app: web.Application, model: str | None = None) -> dict[str, Any] | None:
    """What a model (default: the default one) accepts and defaults to, for /health and /v1/models
    (None while it isn't loaded), with the server's own limits on the same requests."""
    registry = app[keys.REGISTRY]
    if model is None or model == registry.default_name:
        family = app[keys.ENGINE].info.family
    else:
        family = registry.family(model)
    if family is None:
        return None
    server = app[keys.CONFIG].server
    _, min_side, max_side = side_bounds(server, family)
    return family.capabilities() | {
        "min_side": min_side,
        "max_side": max_side,
        "max_steps": server.max_steps,
        "max_guidance": MAX_GUIDANCE,
        "max_images_per_request": server.max_images_per_request,
        "max_prompt_chars": server.max_prompt_chars,
    }


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def wait_for_result(request: web.Request, job: Job, what: str) -> GenerationResult:
    """`job`'s result; drops the job (and raises `ClientGone`) when the client disconnects first."""
    waiter = asyncio.ensure_future(job.wait())
    try:
        while not waiter.done():
            await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S)
            if not waiter.done() and client_gone(request):
                log.info("client went away; dropping its %s request", what)
                job.cancel()
                raise ClientGone()
        return waiter.result()
    finally:
        if not waiter.done():
            waiter.cancel()  # handler cancelled: job.wait() cancels the job


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
    statuses = ENGINE_STATUS if engine_status is None else engine_status
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


async def end_stream_after_error(response: web.StreamResponse, error: Exception, last_event: bytes) -> None:
    """An unexpected error in a streaming handler: before the 200 it is the error middleware's (a
    logged 500); after it, the client gets `last_event` and the end of the stream, the log the rest."""
    if not response.prepared:
        raise error
    log.error("streamed request failed after its response started", exc_info=error)
    with contextlib.suppress(Exception):
        await response.write(last_event)
        await response.write_eof()
