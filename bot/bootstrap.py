"""The one place that wires the core together.

    async with build_core(config, env) as core:
        core.service.register_delivery("discord", ...)
        ...

builds the database engine (refusing to start on a schema that is behind the code, or migrating when
`[database] auto_migrate = true`), the image storage, the inference backend
(`bot.backends.build_backend`) and the `CoreService`, learns what the backend's model accepts
(`ModelWatch`: at start-up, then periodically), starts the dispatcher, and on exit stops the
dispatcher (handing jobs in flight back to the queue), closes the backend and disposes the engine.

A process that runs chat adapters stops the dispatcher itself (`core.dispatcher.stop()`) before it
closes them, as `python -m bot` does: results being delivered then finish over open adapters
(`[bot] shutdown_grace_s`); the stop on exit is then a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.backends.base import InferenceBackend
from bot.config import CoreConfig, load_core_config
from bot.core.db import Database, make_engine
from bot.core.dispatcher import Dispatcher
from bot.core.health import ReadinessCheck
from bot.core.metrics import BotMetrics, instrument
from bot.core.model_watch import ModelWatch
from bot.core.models import utcnow
from bot.core.service import CoreService
from bot.core.storage import ImageStorage, open_storage
from bot.migrate import ensure_schema
from bot.ops import Ops, serve_ops
from bot.settings import ConfigError, read_toml

log = logging.getLogger("bot")


def settle_heap() -> None:
    """Collect what start-up left behind, then freeze what is left (`gc.freeze`), once a process's
    core is built: the modules, SQLAlchemy's tables and compiled statements, the configuration,
    which live as long as the process. The collector's full passes then skip them. A full pass
    over a bot's heap held its event loop 76 ms in the middle of a burst of submissions (a run of
    `tests.bench.core_bench`: that wave's 200 submissions waited 107 ms instead of 30); after the
    freeze a full pass covers only what was made since. What is frozen is never collected, so
    this runs once per process, after start-up (`python -m bot`, the bench's processes), not per
    core: the tests build hundreds of cores in one process."""
    gc.collect()
    gc.freeze()
    log.info("start-up heap frozen: %d objects (the collector skips them)", gc.get_freeze_count())


@dataclass
class Core:
    config: CoreConfig
    raw_config: Mapping[str, Any]
    db: Database
    storage: ImageStorage
    backend: InferenceBackend
    service: CoreService
    dispatcher: Dispatcher
    model_watch: ModelWatch
    ops: Ops  # /metrics and /readyz for whichever HTTP surface the process has


@asynccontextmanager
async def build_core(
    config: Mapping[str, Any] | str | os.PathLike[str] | None,
    env: Mapping[str, str] | None = None,
    *,
    backend: InferenceBackend | None = None,
    start_dispatcher: bool = True,
    dispatcher_owner: str | None = None,
    clock: Callable[[], dt.datetime] = utcnow,
) -> AsyncIterator[Core]:
    """`config`: a parsed TOML mapping, a path, or None (defaults). `backend` overrides the one
    `[backends]` describes (tests pass a FakeBackend); the core closes whichever it uses. `clock`
    is the core's time (UTC, aware): quota periods, leases, timestamps."""
    env = os.environ if env is None else env
    if config is None:
        raw: Mapping[str, Any] = {}
    elif isinstance(config, Mapping):
        raw = config
    else:
        raw = read_toml(Path(config))
    cfg = load_core_config(raw, env)
    engine = make_engine(
        cfg.database_url,
        pool_size=cfg.database.pool_size,
        echo=cfg.database.echo,
        sqlite_busy_timeout_s=cfg.database.sqlite_busy_timeout_s,
    )
    db = Database(engine)
    own_backend = backend
    exits = AsyncExitStack()  # the storage's client, closed after the dispatcher has stopped
    try:
        revision = await ensure_schema(engine, auto_migrate=cfg.database.auto_migrate)
        log.info(
            "database %s at schema revision %s", engine.url.render_as_string(hide_password=True), revision
        )
        storage = await exits.enter_async_context(open_storage(cfg.storage, env))
        if own_backend is None:
            from bot.backends import build_backend

            own_backend = build_backend(raw, env)
        service = CoreService(db, storage, cfg, clock=clock)
        metrics = BotMetrics()
        # The dispatcher gets the backend with its errors counted; Core.backend stays the backend.
        metered_backend = instrument(service, own_backend, metrics)
        ops = Ops(db, metrics, ReadinessCheck(db, own_backend))
        dispatcher = Dispatcher(service, metered_backend, owner=dispatcher_owner)
        model_watch = ModelWatch(service, metered_backend)
        if cfg.bot.metrics_port:
            await exits.enter_async_context(_serving_ops(ops, cfg.bot.metrics_host, cfg.bot.metrics_port))
        await model_watch.start()
        await service.warm_up()  # before the dispatcher: its claims would wait for the write lock
        if start_dispatcher:
            dispatcher.start()
            await dispatcher.first_round()
        core = Core(cfg, raw, db, storage, own_backend, service, dispatcher, model_watch, ops)
        try:
            yield core
        finally:
            await model_watch.stop()
            await dispatcher.stop()
    finally:
        if own_backend is not None:
            try:
                await own_backend.close()
            except Exception:
                log.exception("closing the backend failed")
        await exits.aclose()
        await db.close()


@asynccontextmanager
async def _serving_ops(ops: Ops, host: str, port: int) -> AsyncIterator[None]:
    """`serve_ops` in the background for the block; a port that cannot be bound stops the start."""
    listening = asyncio.Event()
    task = asyncio.create_task(serve_ops(ops, host, port, listening), name="ops-http")
    waiter = asyncio.create_task(listening.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done():
        raise ConfigError(str(task.exception() or "[bot] metrics_port: the server stopped"))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
