"""`python -m bot`: start the core and every chat adapter whose credentials are present.

Each adapter package (`bot.discord_adapter`, `bot.slack_adapter`, `bot.playground`) exposes
`adapter_status(env) -> (on, why)` and `async run(service, config, env, ready)`; this module logs
which adapters are on or off and why, runs the enabled ones next to the dispatcher, and shuts
everything down cleanly on SIGINT/SIGTERM: the dispatcher first (jobs still generating go back to
the queue, results being delivered get `[bot] shutdown_grace_s`), then the adapters, then the
backend, storage and database. Nothing is lost; the next start runs or delivers the rest once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from bot import discord_adapter, playground, slack_adapter
from bot.core.api import ImageService

if TYPE_CHECKING:
    from bot.ops import Ops

log = logging.getLogger("bot")


class Adapter(Protocol):
    """What each adapter package exposes. Importing one is cheap: its platform library loads when
    `run` starts."""

    def adapter_status(self, env: Mapping[str, str]) -> tuple[bool, str]: ...

    async def run(
        self,
        service: ImageService,
        config: Mapping[str, Any],
        env: Mapping[str, str],
        ready: asyncio.Event | None = None,
        ops: Ops | None = None,
    ) -> None: ...


ADAPTERS: tuple[tuple[str, Adapter], ...] = (
    ("discord_adapter", discord_adapter),
    ("slack_adapter", slack_adapter),
    ("playground", playground),
)


def adapter_plan(env: Mapping[str, str]) -> list[tuple[str, Adapter, bool, str]]:
    """(name, adapter, on, why) for each adapter."""
    plan = []
    for name, adapter in ADAPTERS:
        on, why = adapter.adapter_status(env)
        plan.append((name, adapter, on, why))
    return plan


async def amain(config_file: str, env: Mapping[str, str]) -> int:
    from bot.bootstrap import build_core, settle_heap
    from bot.migrate import SchemaOutOfDate
    from bot.settings import ConfigError, read_toml

    try:
        raw = read_toml(config_file)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    plan = adapter_plan(env)
    for name, _module, on, why in plan:
        log.info(
            "adapter %s: %s",
            name,
            why if why.startswith(("on", "off")) else ("on" if on else "off") + f": {why}",
        )
    enabled = [(name, module) for name, module, on, _ in plan if on]
    if not enabled:
        log.error("no adapter is enabled: set DISCORD_TOKEN, or SLACK_BOT_TOKEN and SLACK_SIGNING_SECRET "
                  "(see README), or enable the playground")  # fmt: skip
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        async with build_core(raw, env) as core:
            settle_heap()
            # Any: the adapters' tasks and the stopper below are awaited together.
            tasks: dict[asyncio.Task[Any], str] = {
                asyncio.create_task(
                    module.run(core.service, raw, env, None, ops=core.ops), name=f"adapter {name}"
                ): name
                for name, module in enabled
            }
            stopper = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
            code = 0
            for task in done:
                if task is stopper:
                    log.info("shutting down")
                    continue
                exc = task.exception()
                if exc is not None:
                    log.error("adapter %s crashed: %r", tasks[task], exc, exc_info=exc)
                    code = 1
                else:
                    log.warning("adapter %s stopped", tasks[task])
            # The dispatcher stops first, while the adapters are still open: it claims nothing more,
            # hands the jobs still generating back to the queue, and gives results being delivered
            # `[bot] shutdown_grace_s` to finish. Only then do the adapters close their platforms'
            # HTTP sessions (closed first, they cut deliveries off mid-post), and build_core's exit
            # closes the backend, the storage and the database.
            await core.dispatcher.stop()
            for task in [*tasks, stopper]:
                task.cancel()
            for task in [*tasks, stopper]:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            return code
    except SchemaOutOfDate as e:
        log.error("%s", e)
        return 2
    except ConfigError as e:
        log.error("config error: %s", e)
        return 2


def main(argv: list[str] | None = None) -> int:
    from dotenv import load_dotenv

    from bot.settings import config_path

    parser = argparse.ArgumentParser(
        prog="python -m bot", description="Run the image bot (core + chat adapters)."
    )
    parser.add_argument("--config", help="config file (default $IMAGINE_CONFIG or ./config.toml)")
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))
    parser.add_argument(
        "--sync-commands",
        action="store_true",
        help="sync Discord's slash commands at start-up even if they look unchanged "
        "(sets [discord] force_sync_commands for this run)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Alembic logs a dozen set-up lines at INFO on every start; bot.bootstrap says what matters.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    load_dotenv()
    env: Mapping[str, str] = os.environ
    if args.sync_commands:
        env = {**os.environ, "IMAGINE_DISCORD_FORCE_SYNC_COMMANDS": "true"}
    return asyncio.run(amain(str(config_path(args.config)), env))


if __name__ == "__main__":
    sys.exit(main())
