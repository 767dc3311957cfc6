"""Start-up and shutdown of the Slack adapter in HTTP mode or Socket Mode."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiohttp import web
from slack_bolt.middleware.authorization.async_single_team_authorization import AsyncSingleTeamAuthorization
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

from bot.core.api import ImageService
from bot.ops import Ops, add_ops_routes
from bot.settings import ConfigError, load_section
from bot.slack_adapter import adapter_status
from bot.slack_adapter.app import PLATFORM, SlackAdapter
from bot.slack_adapter.config import SlackConfig

log = logging.getLogger("bot.slack")

# Web API calls (uploads included) that take longer than this are abandoned; Slack answers in well
# under a second normally, and a hung call must not hold a delivery forever.
WEB_API_TIMEOUT_S = 30
# On shutdown, requests being answered get this long to finish; Bolt acks in milliseconds (the work
# runs after the ack), so a few seconds is plenty and a stop never hangs for aiohttp's default 60 s.
SHUTDOWN_GRACE_S = 5.0


def make_client(token: str, cfg: SlackConfig) -> AsyncWebClient:
    # No shared aiohttp session here: Bolt deep-copies the request context (client included) for
    # every lazy listener, and a session cannot be copied. slack_sdk opens one per call instead.
    client = AsyncWebClient(token=token, base_url=cfg.api_base_url, timeout=WEB_API_TIMEOUT_S)
    # The default client does not retry HTTP 429: without this handler a busy channel loses updates.
    client.retry_handlers = [
        AsyncConnectionErrorRetryHandler(max_retry_count=1),
        AsyncRateLimitErrorRetryHandler(max_retry_count=cfg.rate_limit_retries),
    ]
    return client


async def run_slack(
    service: ImageService,
    config: Mapping[str, Any],
    env: Mapping[str, str],
    ready: asyncio.Event | None = None,
    ops: Ops | None = None,
) -> None:
    on, why = adapter_status(env)
    if not on:
        raise ConfigError(f"slack adapter cannot start: {why}")
    cfg = load_section(config, "slack", SlackConfig, environ=env)
    app_token = env.get("SLACK_APP_TOKEN") or ""
    socket_mode = bool(app_token)
    async with aiohttp.ClientSession() as http:
        client = make_client(env["SLACK_BOT_TOKEN"], cfg)
        adapter = SlackAdapter(service, cfg, client, http)
        app = adapter.build_app(env.get("SLACK_SIGNING_SECRET", ""), socket_mode=socket_mode)
        await _check_token(app, client)
        service.register_delivery(PLATFORM, adapter.delivery)
        try:
            if socket_mode:
                await _serve_socket_mode(app, app_token, client, ready)
            else:
                await _serve_http(app, cfg, ready, ops)
        finally:
            service.unregister_delivery(PLATFORM)
            await adapter.status.close()
            await adapter.delivery.close()


async def _check_token(app: Any, client: AsyncWebClient) -> None:
    """auth.test once at start-up: a wrong token stops the adapter with a clear message instead of
    every request failing later, and the answer primes Bolt's authorization middleware so that the
    first command's ack does not wait for this call (the 3 s deadline)."""
    try:
        result = await client.auth_test()
    except SlackApiError as e:
        raise ConfigError(
            f"SLACK_BOT_TOKEN was refused by Slack ({e.response.get('error')}): copy the Bot User OAuth Token "
            "(xoxb-...) from the app's OAuth & Permissions page"
        ) from None
    log.info(
        "slack: connected as %s (user %s) in team %s",
        result.get("user"),
        result.get("user_id"),
        result.get("team"),
    )
    # Bolt's AsyncSingleTeamAuthorization caches this answer in `auth_test_result`; reaching it goes
    # through a private list, so a Bolt upgrade that renames it only costs one extra auth.test call.
    for middleware in getattr(app, "_async_middleware_list", []):
        if isinstance(middleware, AsyncSingleTeamAuthorization) and middleware.auth_test_result is None:
            middleware.auth_test_result = result


async def _serve_http(app: Any, cfg: SlackConfig, ready: asyncio.Event | None, ops: Ops | None) -> None:
    web_app = app.web_app(path=cfg.http_path, port=cfg.http_port)

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "adapter": "slack", "mode": "http"})

    web_app.router.add_get("/healthz", health)
    if ops is not None:
        add_ops_routes(web_app, ops)  # /metrics, /readyz (Socket Mode: [bot] metrics_port serves them)
    runner = web.AppRunner(web_app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S)
    await runner.setup()
    try:
        site = web.TCPSite(runner, cfg.http_host, cfg.http_port)
        await site.start()
        log.info("slack: HTTP mode, listening on http://%s:%s%s", cfg.http_host, cfg.http_port, cfg.http_path)
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


async def _serve_socket_mode(
    app: Any, app_token: str, client: AsyncWebClient, ready: asyncio.Event | None
) -> None:
    from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

    handler = AsyncSocketModeHandler(app, app_token, web_client=client)
    await handler.connect_async()
    log.info("slack: Socket Mode connected")
    if ready is not None:
        ready.set()
    try:
        await asyncio.Event().wait()
    finally:
        await handler.close_async()
