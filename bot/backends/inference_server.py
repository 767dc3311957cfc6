"""Client of the project's inference server (HTTP API v1, docs/inference-server.md).

One `aiohttp.ClientSession` per backend, made on first use and closed by `close()`. Several servers
can be configured: each job starts at the server with the least outstanding work per unit of
capacity (`routing = "least_work"`: its last reported queue and running requests, from the load
headers of its every response or its `/health`, plus this bot's jobs sent there since, over its
largest batch) or at the next one (`routing = "round_robin"`), and fails over to the others
when one is unreachable or overloaded. A server that refused a connection is tried last for a
cool-off period. Rounds over all servers are separated by exponential backoff with jitter, or by the
server's `Retry-After` when it gave one (capped). While every server is unreachable (an outage, a
restart) the job waits, telling the caller with a "waiting" event, for up to `outage_horizon_s`
before it fails. A job that names a model (or LoRAs) goes only to
the servers that host it, as their `GET /v1/models` last said (`models()`), in the same order and
with the same failover among those. With streaming on, the server's NDJSON events
become `BackendEvent`s. Every failure surfaces as a `BackendError` with a message fit for a user or
a log line, never a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.http_exceptions import LineTooLong

from .base import (
    BackendError,
    BackendEvent,
    BackendOutage,
    BackendRejected,
    BackendUnavailable,
    EventCallback,
    GeneratedImage,
    GenerationParams,
    LoraSpec,
    ModelCapabilities,
    ModelInfo,
)
from .config import Routing

log = logging.getLogger(__name__)

TASK_ROUTES = {"txt2img": "/v1/txt2img", "img2img": "/v1/img2img", "inpaint": "/v1/inpaint"}

# The final NDJSON "result" line carries every image in base64 (4 images of 2048x2048 PNG fit);
# a longer line means we are not talking to our server, and reading on would only eat memory.
MAX_EVENT_LINE_BYTES = 64 * 1024 * 1024
MAX_ERROR_MESSAGE_CHARS = 300  # messages reach chat users: keep them to a line or two
# Extra seconds the client waits past a job's deadline for the server's own 504, which says why.
DEADLINE_GRACE_S = 2.0
# /health answers from memory: once connected, a server that takes longer than this is stuck.
CAPABILITIES_READ_S = 5.0


class _NotHosted(Exception):
    """A server does not have the job's model or one of its LoRAs (400 unknown_model or
    unknown_lora): another server may."""

    def __init__(self, rejected: BackendRejected):
        super().__init__(rejected.message)
        self.rejected = rejected


class _RetryableFailure(Exception):
    """A server could not take the job now; another server, or a later round, may. `outage`: the
    server is not serving at all (down, restarting, loading), as opposed to busy."""

    def __init__(
        self,
        reason: str,
        *,
        server_down: bool = False,
        retry_after: float | None = None,
        outage: bool | None = None,
    ):
        super().__init__(reason)
        self.reason = reason
        self.server_down = server_down
        self.retry_after = retry_after
        self.outage = server_down if outage is None else outage


@dataclass
class _Server:
    url: str
    down_until: float = 0.0
    # Model name -> its LoRAs, from the server's /v1/models; None until it has answered, {} for a
    # server from before the models registry (only its default model, which has no name to ask by).
    models: dict[str, frozenset[str]] | None = None
    # Its load as it last reported it (response headers or /health): requests queued and running,
    # and its largest batch. None until it has said.
    reported: int | None = None
    batch: int | None = None
    # This bot's jobs there now: attempt number -> `sends` when it was sent. Those sent after the
    # last report are not in `reported` yet.
    in_flight: dict[int, int] = dataclasses.field(default_factory=dict)
    sends: int = 0
    reported_at_send: int = 0

    def outstanding(self) -> float:
        """Work ahead of a new job here, in batches: what the server last reported plus this bot's
        jobs sent since, over its batch size (1 while unknown)."""
        since = sum(1 for sent in self.in_flight.values() if sent > self.reported_at_send)
        work = max(len(self.in_flight), (self.reported or 0) + since)
        return work / (self.batch or 1)

    def report(self, queued: int, running: int, batch: int | None) -> None:
        self.reported = max(0, queued) + max(0, running)
        if batch is not None and batch > 0:
            self.batch = batch
        self.reported_at_send = self.sends

    def hosts(self, model: str | None, loras: tuple[LoraSpec, ...]) -> bool | None:
        """Whether this server can run a job on `model` with `loras` (None: not known yet)."""
        if model is None and not loras:
            return True
        if self.models is None:
            return None
        if model is None:
            return False  # LoRAs on an unnamed default model: the core names the model first
        names = self.models.get(model)
        return names is not None and all(lora.name in names for lora in loras)


class InferenceServerBackend:
    """`InferenceBackend` over HTTP to one or more inference servers."""

    name = "inference_server"

    def __init__(
        self,
        urls: Sequence[str],
        *,
        token: str | None = None,
        connect_timeout_s: float = 5.0,
        request_timeout_s: float = 600.0,
        max_retries: int = 4,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 15.0,
        retry_after_max_s: float = 30.0,
        server_cooloff_s: float = 30.0,
        outage_horizon_s: float = 600.0,
        routing: Routing = "least_work",
        stream: bool = True,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not urls:
            raise ValueError("at least one inference server URL is required")
        self._servers = [_Server(u.rstrip("/")) for u in urls]
        self._token = token or None
        self._connect_timeout_s = connect_timeout_s
        self._request_timeout_s = request_timeout_s
        self._max_retries = max_retries
        self._backoff_base_s = backoff_base_s
        self._backoff_max_s = backoff_max_s
        self._retry_after_max_s = retry_after_max_s
        self._server_cooloff_s = server_cooloff_s
        self._outage_horizon_s = outage_horizon_s
        self._routing = routing
        self._attempts = 0
        self._stream = stream
        # Injected so tests can check the delays chosen without waiting for them.
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._clock = clock
        self._next_server = 0
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        # Told of every failed attempt at one server (the bot's metrics: errors by server).
        self._error_observers: list[Callable[[str, str], None]] = []

    # --- introspection, for logs and tests ---------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self._servers]

    def servers_down(self) -> list[str]:
        now = self._clock()
        return [s.url for s in self._servers if s.down_until > now]

    def capacity(self) -> int | None:
        """The sum of the batch sizes the servers reported (those that have not: not counted);
        None until one has."""
        known = [s.batch for s in self._servers if s.batch is not None]
        return sum(known) if known else None

    def outstanding(self) -> dict[str, float]:
        """Each server's outstanding work in batches, as routing sees it (for logs and tests)."""
        return {s.url: s.outstanding() for s in self._servers}

    # --- ServerFleet: per-server errors and reachability (bot metrics and readiness) ----------------

    def observe_server_errors(self, observer: Callable[[str, str], None]) -> None:
        self._error_observers.append(observer)

    def _report(self, server: _Server, kind: str) -> None:
        for observer in self._error_observers:
            observer(server.url, kind)

    async def reachable_servers(self) -> list[str]:
        """The servers whose `/health` answers 200 now (loading or not: they take jobs into their
        queue)."""
        if self._closed:
            return []
        timeout = aiohttp.ClientTimeout(
            total=self._connect_timeout_s + CAPABILITIES_READ_S, connect=self._connect_timeout_s
        )

        async def answers(server: _Server) -> bool:
            try:
                async with self._get_session().get(server.url + "/health", timeout=timeout) as resp:
                    return resp.status == 200
            except (aiohttp.ClientError, TimeoutError):
                return False

        found = await asyncio.gather(*(answers(s) for s in self._servers))
        return [s.url for s, ok in zip(self._servers, found, strict=True) if ok]

    # --- protocol ----------------------------------------------------------------------------------

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def capabilities(self) -> ModelCapabilities | None:
        """The model's capabilities from every server's `/health`; None when none answers with them
        (all down or still loading). Servers that disagree (different models behind one bot) are
        merged to what all of them accept, with a warning: a job must fit whichever server runs it."""
        if self._closed:
            return None
        found = await asyncio.gather(*(self._server_capabilities(s) for s in self._servers))
        known = [c for c in found if c is not None]
        if not known:
            return None
        merged = merge_capabilities(known)
        if any(c != known[0] for c in known[1:]):
            log.warning(
                "inference servers serve different models (%s): using what all of them accept",
                ", ".join(sorted({c.label for c in known})),
            )
        return merged

    async def models(self) -> list[ModelInfo] | None:
        """The models of every server's `GET /v1/models`, by name, the first server's default first;
        None when no server offers a choice (all from before the registry, down or loading). A model
        on several servers has what all of them accept (`merge_capabilities`) and the LoRAs any of
        them has (a job with a LoRA goes only to servers that have it). Remembers which server hosts
        what, for routing."""
        if self._closed:
            return None
        found = await asyncio.gather(*(self._server_models(s) for s in self._servers))
        by_name: dict[str, list[tuple[str, ModelInfo]]] = {}
        for server, infos in zip(self._servers, found, strict=True):
            if infos is None:
                continue  # not reachable: keep what it said last
            server.models = {m.name: frozenset(m.loras) for m in infos}
            for info in infos:
                by_name.setdefault(info.name, []).append((server.url, info))
        if not by_name:
            return None
        merged = []
        for hosted in by_name.values():
            infos = [info for _, info in hosted]
            known = [i.capabilities for i in infos if i.capabilities is not None]
            merged.append(
                dataclasses.replace(
                    infos[0],
                    capabilities=merge_capabilities(known) if known else None,
                    loras=tuple(dict.fromkeys(lora for i in infos for lora in i.loras)),
                    default=any(i.default for i in infos),
                    loaded=any(i.loaded for i in infos),
                    servers=tuple(url for url, _ in hosted),
                )
            )
        # The default of the first server that has one leads: it is what a job without a model gets.
        merged.sort(key=lambda m: not m.default)
        return merged

    async def _server_models(self, server: _Server) -> list[ModelInfo] | None:
        """What one server's /v1/models lists; [] for a server from before the registry (no "data"
        entries of the registry); None when it can't be asked now."""
        timeout = aiohttp.ClientTimeout(
            total=self._connect_timeout_s + CAPABILITIES_READ_S, connect=self._connect_timeout_s
        )
        try:
            async with self._get_session().get(server.url + "/v1/models", timeout=timeout) as resp:
                if resp.status in (404, 405):
                    return []  # no registry: one model, described by /health
                data = await resp.json(content_type=None) if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            log.info("inference server %s: no model list (%s)", server.url, type(e).__name__)
            return None
        entries = data.get("data") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            return None if data is None else []
        infos = []
        for entry in entries:
            if not isinstance(entry, dict) or not _registry_entry(entry):
                continue  # an OpenAI-style entry of an older server: no choice offered through it
            try:
                infos.append(ModelInfo.from_json(entry))
            except (ValueError, TypeError, AttributeError) as e:
                log.warning("inference server %s lists a malformed model: %s", server.url, e)
        return infos

    async def _server_capabilities(self, server: _Server) -> ModelCapabilities | None:
        timeout = aiohttp.ClientTimeout(
            total=self._connect_timeout_s + CAPABILITIES_READ_S, connect=self._connect_timeout_s
        )
        try:
            async with self._get_session().get(server.url + "/health", timeout=timeout) as resp:
                self._note_load(server, resp)
                data = await resp.json(content_type=None) if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            log.info("inference server %s: no capabilities (%s)", server.url, type(e).__name__)
            if isinstance(e, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
                # A failed health check: jobs go elsewhere first until it answers again.
                server.down_until = self._clock() + self._server_cooloff_s
            return None
        if data is not None and server.down_until > self._clock():
            server.down_until = 0.0  # it answers again: back in the rotation at once
        raw = data.get("capabilities") if isinstance(data, dict) else None
        if raw is None:
            return None  # loading, or a server from before capabilities were reported
        try:
            return ModelCapabilities.from_json(raw)
        except (ValueError, TypeError, AttributeError) as e:
            log.warning("inference server %s reports malformed capabilities: %s", server.url, e)
            return None

    async def generate(
        self, params: GenerationParams, on_event: EventCallback | None = None
    ) -> list[GeneratedImage]:
        if self._closed:
            raise BackendUnavailable("the inference server backend is closed")
        route = TASK_ROUTES.get(params.task)
        if route is None:
            raise BackendRejected(f"unknown task {params.task!r}", "task")
        body = _request_body(params, stream=self._stream and on_event is not None)
        # The job's deadline covers every attempt and every wait between them, not each one anew;
        # time spent waiting out an outage doesn't count (the job has not run anywhere yet).
        deadline = None if params.timeout_s is None else self._clock() + params.timeout_s
        failures: dict[str, str] = {}
        not_hosted: set[str] = set()
        rounds = self._max_retries + 1
        round_no = 0
        outage_since: float | None = None
        while True:
            retry_after: float | None = None
            servers = self._servers_for(params)
            # An outage: every server tried this round was not serving (down, restarting, loading).
            outage = True
            tried = 0
            for server in servers:
                if server.url in not_hosted:
                    continue
                remaining = None if deadline is None else deadline - self._clock()
                if remaining is not None and remaining <= 0:
                    outage = False
                    break
                try:
                    return await self._attempt(server, route, body, params, remaining, on_event)
                except _NotHosted as f:
                    # The server's list changed since we last asked (or was not known): not asked
                    # again for this job; when no server has what it needs, that is the answer.
                    failures[server.url] = f.rejected.message
                    not_hosted.add(server.url)
                    if all(s.url in not_hosted for s in servers):
                        raise f.rejected from None
                    continue
                except BackendError as e:
                    self._report(server, type(e).__name__)
                    raise
                except _RetryableFailure as f:
                    self._report(server, "unreachable" if f.server_down else "overloaded")
                    failures[server.url] = f.reason
                    tried += 1
                    outage = outage and f.outage
                    log.warning(
                        "inference server %s: %s (round %d/%d)", server.url, f.reason, round_no + 1, rounds
                    )
                    if f.server_down:
                        server.down_until = self._clock() + self._server_cooloff_s
                    if f.retry_after is not None:
                        retry_after = max(retry_after or 0.0, f.retry_after)
            now = self._clock()
            if outage and tried:
                # No server is serving: an outage or a restart, not a refusal of this job.
                outage_since = now if outage_since is None else outage_since
                await _emit(
                    on_event,
                    BackendEvent(
                        "waiting", extra={"waited_s": now - outage_since, "reason": _tried(failures)}
                    ),
                )
            else:
                outage_since = None
            if round_no + 1 >= rounds:
                if outage_since is None:
                    break
                # Past the usual rounds, an outage is waited out up to the horizon: the servers are
                # restarting or their host is rebooting, and the job has not run anywhere yet.
                waited = now - outage_since
                if waited >= self._outage_horizon_s:
                    raise BackendOutage(
                        f"no inference server has been reachable for {waited:.0f} s "
                        f"(outage_horizon_s); tried {_tried(failures)}",
                        waited_s=waited,
                    )
                await self._sleep(
                    min(self._delay_before_round(round_no, retry_after), self._outage_horizon_s - waited)
                )
                if params.timeout_s is not None:
                    deadline = self._clock() + params.timeout_s  # the wait doesn't eat the job's time
                continue
            delay = self._delay_before_round(round_no, retry_after)
            if deadline is not None and self._clock() + delay >= deadline:
                raise BackendUnavailable(
                    f"no inference server could take the job before its deadline; tried {_tried(failures)}"
                )
            await self._sleep(delay)
            round_no += 1
        raise BackendUnavailable(
            f"no inference server could take the job after {rounds} attempt(s); tried {_tried(failures)}"
        )

    # --- internals ---------------------------------------------------------------------------------

    def _servers_for(self, params: GenerationParams) -> list[_Server]:
        """`_server_order()` kept to the servers that host the job's model and LoRAs; those not
        heard from yet go last (they may host it). BackendRejected when none does."""
        order = self._server_order()
        if params.model is None and not params.loras:
            return order
        hosting = [s for s in order if s.hosts(params.model, params.loras)]
        unknown = [s for s in order if s.hosts(params.model, params.loras) is None]
        if not hosting and not unknown:
            loras = ", ".join(lora.name for lora in params.loras)
            raise BackendRejected(
                f"no inference server has the model {params.model}"
                + (f" with the LoRA(s) {loras}" if loras else ""),
                "model",
            )
        return hosting + unknown

    def _server_order(self) -> list[_Server]:
        """Least outstanding work first (ties: round-robin), or plain round-robin; servers cooling
        off after a connection failure or a failed health check go last, not away (fail-over)."""
        n = len(self._servers)
        start = self._next_server % n
        self._next_server = (start + 1) % n
        rotated = self._servers[start:] + self._servers[:start]
        if self._routing == "least_work":
            rotated.sort(key=_Server.outstanding)  # stable: equal loads keep the rotation
        now = self._clock()
        return [s for s in rotated if s.down_until <= now] + [s for s in rotated if s.down_until > now]

    def _delay_before_round(self, round_no: int, retry_after: float | None) -> float:
        ceiling = min(self._backoff_max_s, self._backoff_base_s * (2**round_no))
        # "Equal jitter": at least half the backoff, so retries stay spaced, plus a random half.
        delay = ceiling / 2 + self._rng.uniform(0, ceiling / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self._retry_after_max_s))
        return delay

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"User-Agent": "imagine-bot"}
            if self._token:
                headers["Authorization"] = f"Bearer {self._token}"
            self._session = aiohttp.ClientSession(headers=headers)
        return self._session

    async def _attempt(
        self,
        server: _Server,
        route: str,
        body: dict[str, Any],
        params: GenerationParams,
        remaining_s: float | None,
        on_event: EventCallback | None,
    ) -> list[GeneratedImage]:
        if remaining_s is None:
            total = self._request_timeout_s
        else:
            # The server gets the time left and answers 504 when it runs out; the client waits a
            # little longer so that answer (which says why) arrives instead of a bare timeout.
            body = {**body, "timeout_s": round(remaining_s, 3)}
            total = remaining_s + DEADLINE_GRACE_S
        timeout = aiohttp.ClientTimeout(total=total, connect=self._connect_timeout_s)
        headers = {"Accept": "application/x-ndjson"} if body.get("stream") else {"Accept": "application/json"}
        session = self._get_session()
        self._attempts += 1
        attempt = self._attempts
        server.sends += 1
        server.in_flight[attempt] = server.sends
        try:
            async with session.post(server.url + route, json=body, headers=headers, timeout=timeout) as resp:
                self._note_load(server, resp)
                if resp.status != 200:
                    await self._raise_for_status(resp)
                if resp.content_type == "application/x-ndjson":
                    result = await self._read_stream(resp, on_event)
                else:
                    result = await _read_json(resp)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
            raise _RetryableFailure(_connect_reason(e), server_down=True) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError):
            # The job may or may not have run; generation is deterministic per seed, so re-running
            # it elsewhere is safe.
            raise _RetryableFailure("connection lost during the request", server_down=True) from None
        except TimeoutError:
            raise BackendUnavailable(
                f"the inference server at {server.url} did not finish the job within {total:g} s"
            ) from None
        except aiohttp.ClientError as e:
            raise BackendUnavailable(f"request to {server.url} failed: {type(e).__name__}") from None
        finally:
            del server.in_flight[attempt]
        return _images_from_result(result, params, server.url)

    def _note_load(self, server: _Server, resp: aiohttp.ClientResponse) -> None:
        """The server's load from its response headers (docs/inference-server.md), when it sends them."""
        queued = _header_int(resp.headers.get("X-Queue-Depth"))
        running = _header_int(resp.headers.get("X-Running"))
        if queued is not None and running is not None:
            server.report(queued, running, _header_int(resp.headers.get("X-Max-Batch")))

    async def _raise_for_status(self, resp: aiohttp.ClientResponse) -> None:
        code, message, fld = await _read_error(resp)
        if resp.status == 502:
            # A reverse proxy in front of a server that is down: treat it like a refused connection.
            raise _RetryableFailure("bad gateway (HTTP 502)", server_down=True)
        if resp.status in (503, 429):
            raise _RetryableFailure(
                _busy_reason(code, message),
                retry_after=_parse_retry_after(resp.headers.get("Retry-After")),
                outage=code in _OUTAGE_CODES,
            )
        _raise_error_body(resp.status, code, message, fld, str(resp.url.origin()))

    async def _read_stream(
        self, resp: aiohttp.ClientResponse, on_event: EventCallback | None
    ) -> dict[str, Any]:
        while True:
            try:
                line = await resp.content.readuntil(b"\n", max_size=MAX_EVENT_LINE_BYTES)
            except (LineTooLong, ValueError):
                raise BackendError("the inference server sent an oversized event line") from None
            if not line:
                # The stream ended without a result: the server went away mid-job.
                raise aiohttp.ServerDisconnectedError()
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
                kind = event["event"]
            except (ValueError, KeyError, TypeError):
                raise BackendError("the inference server sent an unreadable progress event") from None
            if kind == "result":
                return event
            if kind == "error":
                err = event.get("error") or {}
                code = str(err.get("code") or "internal")
                message = str(err.get("message") or "")[:MAX_ERROR_MESSAGE_CHARS]
                if code in _BUSY_REASONS:
                    raise _RetryableFailure(_busy_reason(code, message), outage=code in _OUTAGE_CODES)
                _raise_error_body(
                    _STATUS_FOR_CODE.get(code, 500), code, message, err.get("field"), str(resp.url.origin())
                )
            backend_event = _to_backend_event(event)
            if backend_event is not None and on_event is not None:
                try:
                    await on_event(backend_event)
                except Exception:
                    # A failing progress display must not cost the user their image.
                    log.exception("progress callback failed for event %s", kind)


# Server error codes that mean "not now": another server or a later round may take the job.
_BUSY_REASONS = {"overloaded": "overloaded", "not_ready": "still loading", "shutting_down": "shutting down"}
# Of those, the ones that mean the server is not serving at all (restarting): an outage, waited out.
_OUTAGE_CODES = ("not_ready", "shutting_down")


async def _emit(on_event: EventCallback | None, event: BackendEvent) -> None:
    if on_event is None:
        return
    try:
        await on_event(event)
    except Exception:
        # A failing status display must not cost the user their image.
        log.exception("event callback failed for event %s", event.kind)


def _header_int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _busy_reason(code: str, message: str) -> str:
    reason = _BUSY_REASONS.get(code, "overloaded")
    return f"{reason}: {message}" if message else reason


_STATUS_FOR_CODE = {
    "invalid_request": 400,
    "unknown_model": 400,
    "unknown_lora": 400,
    "invalid_lora": 400,
    "unauthorized": 401,
    "not_found": 404,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "overloaded": 503,
    "deadline_exceeded": 504,
    "internal": 500,
}


# The models registry's 400s, as users read them; the server's message names the model or LoRA.
_MODEL_CODES = {
    "unknown_model": "that model is not available",
    "unknown_lora": "that LoRA is not available",
    "invalid_lora": "that LoRA can't be used this way",
}
_NOT_HOSTED_CODES = ("unknown_model", "unknown_lora")


def _request_body(params: GenerationParams, *, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": params.prompt,
        "n": params.n,
        "seeds": list(params.seeds),
        "width": params.width,
        "height": params.height,
        "steps": params.steps,
        "guidance": params.guidance,
        "stream": stream,
    }
    if params.negative_prompt:
        body["negative_prompt"] = params.negative_prompt
    if params.priority:
        body["priority"] = params.priority  # the continuous engine admits lower values first
    # Sent only when set, so servers from before the models registry never see the fields.
    if params.model:
        body["model"] = params.model
    if params.loras:
        body["loras"] = [{"name": lora.name, "weight": lora.weight} for lora in params.loras]
    if params.task in ("img2img", "inpaint"):
        if not params.image:
            raise BackendRejected(f"{params.task} needs an input image", "image")
        body["image"] = base64.b64encode(params.image).decode("ascii")
        body["strength"] = params.strength
    if params.task == "inpaint":
        if not params.mask:
            raise BackendRejected("inpainting needs a mask", "mask")
        body["mask"] = base64.b64encode(params.mask).decode("ascii")
    return body


def _registry_entry(entry: dict[str, Any]) -> bool:
    """An entry of the models registry: its capabilities, whether it is the default, its LoRAs.
    Servers from before the registry list their one model OpenAI-style, with its capabilities too
    but neither `default` nor `loras`, and refuse a request that names a model (unknown field)."""
    return "capabilities" in entry and isinstance(entry.get("default"), bool) and "loras" in entry


def merge_capabilities(found: Sequence[ModelCapabilities]) -> ModelCapabilities:
    """What every one of `found` accepts: shared tasks, a size multiple of all, the narrowest bounds;
    the defaults and semantics of the first (the first server in `[backends] urls`)."""
    first = found[0]
    multiple = math.lcm(*(c.size_multiple for c in found))

    def fit(side: int) -> int:
        return max(multiple, round(side / multiple) * multiple)

    return dataclasses.replace(
        first,
        tasks=tuple(t for t in first.tasks if all(t in c.tasks for c in found)),
        size_multiple=multiple,
        default_width=fit(first.default_width),
        default_height=fit(first.default_height),
        min_side=max(c.min_side for c in found),
        max_side=min(c.max_side for c in found),
        max_steps=min(c.max_steps for c in found),
        max_guidance=min(c.max_guidance for c in found),
        max_images=min(c.max_images for c in found),
        max_prompt_chars=min(c.max_prompt_chars for c in found),
    )


def _to_backend_event(event: dict[str, Any]) -> BackendEvent | None:
    kind = event.get("event")
    try:
        if kind == "queued":
            return BackendEvent("queued", position=int(event.get("position", 0)))
        if kind == "started":
            extra = {"batch_size": int(event["batch_size"])} if "batch_size" in event else {}
            return BackendEvent("started", extra=extra)
        if kind == "progress":
            return BackendEvent("progress", step=int(event["step"]), total=int(event["total"]))
        if kind == "preview":
            png = base64.b64decode(event["png_base64"], validate=True)
            return BackendEvent(
                "preview",
                step=int(event["step"]),
                total=int(event["total"]),
                extra={"index": int(event["index"]), "png": png},
            )
    except (KeyError, TypeError, ValueError, binascii.Error):
        log.warning("ignoring malformed %s event from the inference server", kind)
        return None
    return None  # events added to the API later are not errors for an older client


async def _read_json(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        data = await resp.json(content_type=None)
    except (ValueError, aiohttp.ContentTypeError):
        raise BackendError("the inference server sent a response that is not JSON") from None
    if not isinstance(data, dict):
        raise BackendError("the inference server sent an unexpected response")
    return data


async def _read_error(resp: aiohttp.ClientResponse) -> tuple[str, str, str | None]:
    """(code, message, field) from an error body; tolerant of proxies that answer in HTML."""
    try:
        data = await resp.json(content_type=None)
        err = data["error"]
        return (
            str(err.get("code") or ""),
            str(err.get("message") or "")[:MAX_ERROR_MESSAGE_CHARS],
            err.get("field") if isinstance(err.get("field"), str) else None,
        )
    except (ValueError, KeyError, TypeError, AttributeError, aiohttp.ClientError):
        return "", resp.reason or "", None


def _raise_error_body(status: int, code: str, message: str, fld: Any, origin: str) -> None:
    fld = fld if isinstance(fld, str) else None
    if status == 400 and code in _MODEL_CODES:
        message = message or _MODEL_CODES[code]
        rejected = BackendRejected(f"{_MODEL_CODES[code]}: {message}", fld)
        if code in _NOT_HOSTED_CODES:
            raise _NotHosted(rejected)
        raise rejected
    if status == 401:
        raise BackendRejected(
            f"the inference server at {origin} refused the API token (check INFERENCE_API_TOKEN)"
        )
    if 400 <= status < 500:
        raise BackendRejected(message or f"the inference server rejected the request (HTTP {status})", fld)
    if status == 504:
        raise BackendUnavailable(message or "the job missed its deadline on the inference server")
    raise BackendError(f"the inference server failed (HTTP {status}): {message or 'no details'}")


def _images_from_result(
    result: dict[str, Any], params: GenerationParams, origin: str
) -> list[GeneratedImage]:
    try:
        items = result["images"]
        images = [
            GeneratedImage(png=base64.b64decode(item["png_base64"], validate=True), seed=int(item["seed"]))
            for item in items
        ]
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise BackendError(f"the inference server at {origin} sent a malformed result") from None
    if len(images) != params.n:
        raise BackendError(
            f"the inference server at {origin} sent {len(images)} image(s), expected {params.n}"
        )
    return images


def _tried(failures: dict[str, str]) -> str:
    return ", ".join(f"{url} ({reason})" for url, reason in failures.items()) or "none"


def _parse_retry_after(value: str | None) -> float | None:
    # Only the delta-seconds form: our server sends it, and HTTP dates need a synchronised clock.
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def _connect_reason(e: Exception) -> str:
    if isinstance(e, aiohttp.ConnectionTimeoutError):
        return "connection timed out"
    os_error = getattr(e, "os_error", None)
    if isinstance(os_error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, aiohttp.ClientConnectorDNSError):
        return "host name not found"
    return "cannot connect"
