"""Serve the playground inside the bot's event loop.

Gradio is mounted on a FastAPI app served by a uvicorn `Server` whose `serve()` coroutine runs as a
task of the loop that runs the core. Gradio then awaits its async handlers on that same loop, so they
call the core's `ImageService` (SQLAlchemy async engine, dispatcher) directly, with no thread
hand-off. uvicorn's own signal handling is switched off: `python -m bot` owns SIGINT/SIGTERM and stops
the playground by cancelling `run_playground`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.playground.config import PLATFORM, PlaygroundConfig, load_playground_config
from bot.playground.delivery import WebDelivery
from bot.playground.limits import BodyLimit

if TYPE_CHECKING:
    from bot.ops import Ops

log = logging.getLogger("bot.playground")

# Seconds the server gets to finish open requests (a streaming job view ends at once on cancel).
SHUTDOWN_GRACE_S = 5  # whole seconds: uvicorn takes an int
# How long start-up may take before we call it failed (Gradio builds its config in well under a second).
STARTUP_TIMEOUT_S = 60.0
# Uploads: Gradio refuses files over this itself; the core refuses images over [bot] max_upload_bytes.
MAX_UPLOAD = "20mb"
# Any request body: an upload (20 MB) plus its multipart framing; API calls are a few KB of JSON.
MAX_BODY_BYTES = 21 * 1024 * 1024


def _quiet_gradio_env() -> None:
    # No analytics or version checks: the playground works offline and tells nobody it runs.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def url_for(cfg: PlaygroundConfig, port: int) -> str:
    host = cfg.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(
            f"[playground] cannot listen on {host}:{port} ({e.strerror}); is another playground running? "
            "Set [playground] port (or IMAGINE_PLAYGROUND_PORT) to a free port."
        ) from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _import_ui_modules() -> None:
    import gradio  # noqa: F401
    import uvicorn  # noqa: F401

    import bot.playground.ui  # noqa: F401


def build_app(
    service: Any,
    cfg: PlaygroundConfig,
    env: Mapping[str, str],
    delivery: WebDelivery,
    media: Path,
    ops: Ops | None = None,
) -> Any:
    """The FastAPI app with the playground mounted at `/`."""
    import gradio as gr
    from fastapi import FastAPI
    from starlette.routing import Mount

    from bot.playground.ui import Identity, PlaygroundUI

    identity = Identity.from_env(cfg, env)
    blocks = PlaygroundUI(service, cfg, identity, delivery, media).build()
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    if ops is not None:
        from fastapi.responses import JSONResponse, Response
        from prometheus_client import CONTENT_TYPE_LATEST

        # response_model=None, -> Any: FastAPI reads endpoint annotations from the module's globals,
        # where these locally imported classes are not.
        @app.get("/metrics", response_model=None)
        async def metrics() -> Any:
            return Response(await ops.metrics_text(), media_type=CONTENT_TYPE_LATEST)

        @app.get("/readyz", response_model=None)
        async def readyz() -> Any:
            state = await ops.ready()
            body = {"status": "ready" if state.ready else "not ready", "reason": state.reason}
            return JSONResponse(body, status_code=200 if state.ready else 503)

    # System fonts: the default theme would fetch web fonts, and the playground must work offline.
    theme = gr.themes.Soft(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    gr.mount_gradio_app(
        app,
        blocks,
        path="/",
        auth=identity.check_login if identity.auth_required else None,
        auth_message="Sign in with your name and the playground password."
        if identity.auth_required
        else None,
        allowed_paths=[str(media)],
        footer_links=["api"],
        run_history=False,
        ssr_mode=False,
        theme=theme,
        mcp_server=False,
        # The core limits uploads too ([bot] max_upload_bytes); this stops larger ones earlier.
        max_file_size=MAX_UPLOAD,
        # An exception's text is for the log, not the browser: handlers answer with their own
        # messages, and what escapes them (Gradio's own input checks) names internals.
        show_error=False,
    )
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    app.state.blocks = blocks
    # The Gradio sub-app that serves the routes: its stop_event ends the browsers' heartbeat streams.
    app.state.gradio_apps = [r.app for r in app.routes if isinstance(r, Mount)]
    return app


@contextlib.contextmanager
def _no_signals() -> Iterator[None]:
    yield


async def run_playground(
    service: Any,
    raw_config: Mapping[str, Any],
    env: Mapping[str, str],
    ready: asyncio.Event | None = None,
    ops: Ops | None = None,
) -> None:
    cfg = load_playground_config(raw_config, env)
    if not cfg.enabled:
        log.info("playground: off ([playground] enabled = false)")
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()  # an adapter runs until cancelled
        return
    _quiet_gradio_env()
    # Importing gradio takes seconds of CPU; done on the loop it would stall the other adapters
    # (Discord heartbeats, Slack's 3 s ack) started beside the playground. A worker thread
    # still shares the GIL, but the loop gets its switch intervals and keeps answering.
    await asyncio.to_thread(_import_ui_modules)
    import uvicorn

    class Server(uvicorn.Server):
        # The bot owns the process's signals; we are stopped by cancellation.
        def capture_signals(self):  # type: ignore[override]
            return _no_signals()

    delivery = WebDelivery(service)
    media = Path(tempfile.mkdtemp(prefix="imagine-playground-"))
    sock = _bind(cfg.host, cfg.port)
    port = sock.getsockname()[1]
    service.register_delivery(PLATFORM, delivery)
    server: Any = None
    app: Any = None
    task: asyncio.Task[None] | None = None
    try:
        app = build_app(service, cfg, env, delivery, media, ops)
        server = Server(
            uvicorn.Config(
                app,
                log_level="warning",
                access_log=False,
                lifespan="on",
                timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
            )
        )
        task = asyncio.create_task(server.serve(sockets=[sock]), name="playground http")
        async with asyncio.timeout(STARTUP_TIMEOUT_S):
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("the playground's HTTP server stopped during start-up")
                await asyncio.sleep(0.05)
        url = url_for(cfg, port)
        log.info(
            "playground: open %s in your browser%s",
            url,
            " (password required)" if env.get("PLAYGROUND_PASSWORD") else "",
        )
        if ready is not None:
            ready.set()
        await asyncio.shield(task)
    finally:
        if app is not None:
            # First: end the open tabs' heartbeat streams and stop Gradio's queue, so the HTTP server
            # can close its connections at once instead of waiting out the grace period.
            for gradio_app in app.state.gradio_apps:
                gradio_app.stop_event.set()
            app.state.blocks.close(verbose=False)
        if server is not None and task is not None and not task.done():
            server.should_exit = True
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), SHUTDOWN_GRACE_S + 5)
            if not task.done():
                server.force_exit = True
                task.cancel()
        service.unregister_delivery(PLATFORM)
        sock.close()
        shutil.rmtree(media, ignore_errors=True)
        log.info("playground: stopped")
