"""The bot's operations endpoints: `/metrics` (Prometheus text), `/readyz` (200 when the database and
an inference server answer, else 503 with the reason) and `/healthz` (liveness: the process serves).

They are added to the HTTP surfaces a process already has (the Slack runner's web app, the
playground) and, for a process without one (the Discord bot), served on `[bot] metrics_port` by
`serve_ops`. `Ops` is built once, with the core (`bot.bootstrap.build_core`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from bot.core.db import Database
from bot.core.health import Readiness, ReadinessCheck
from bot.core.metrics import BotMetrics

log = logging.getLogger("bot.ops")


@dataclass
class Ops:
    db: Database
    metrics: BotMetrics
    readiness: ReadinessCheck

    async def metrics_text(self) -> bytes:
        return await self.metrics.render(self.db)

    async def ready(self) -> Readiness:
        return await self.readiness.check()


def add_ops_routes(app: web.Application, ops: Ops, *, healthz: bool = False) -> None:
    """Add `/metrics` and `/readyz` (and `/healthz` when the app has none) to an aiohttp app."""

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=await ops.metrics_text(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def readyz(_: web.Request) -> web.Response:
        state = await ops.ready()
        return web.json_response(
            {"status": "ready" if state.ready else "not ready", "reason": state.reason},
            status=200 if state.ready else 503,
        )

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/readyz", readyz)
    if healthz:
        app.router.add_get("/healthz", health)


async def serve_ops(ops: Ops, host: str, port: int, ready: asyncio.Event | None = None) -> None:
    """Serve the operations endpoints until cancelled (a process whose adapters serve no HTTP)."""
    app = web.Application()
    add_ops_routes(app, ops, healthz=True)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as e:
            raise OSError(
                f"[bot] metrics_port: cannot listen on {host}:{port} ({e.strerror}); set [bot] metrics_port "
                "(or IMAGINE_BOT_METRICS_PORT) to a free port, or 0 for none"
            ) from None
        log.info("operations endpoints on http://%s:%s (/metrics, /readyz, /healthz)", host, port)
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
