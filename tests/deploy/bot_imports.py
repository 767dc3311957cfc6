"""A bot host installs no torch: import every bot module and build the Discord, Slack and playground
apps from config while torch, diffusers, transformers, accelerate and `inference_server` cannot be
imported.

    python tests/deploy/bot_imports.py [--adapters discord,slack,playground]

Run as a script (tests/deploy/test_packaging.py runs it in a subprocess; `make install-check` runs it
in a fresh virtualenv with only a chat extra installed), so that nothing imported by the test run
itself hides an import. Prints one line per built app and exits 0; a blocked import fails with the
traceback of the module that tried it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.abc
import pkgutil
import sys
import tempfile
from pathlib import Path
from typing import Any

BLOCKED = ("torch", "diffusers", "transformers", "accelerate", "inference_server")
ADAPTERS = ("discord", "slack", "playground")


class Blocked(importlib.abc.MetaPathFinder):
    """Refuses the server's packages, as if they were not installed, and remembers who asked."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.split(".")[0] in BLOCKED:
            self.attempts.append(name)
            raise ModuleNotFoundError(f"blocked: the bot must not import {name!r}", name=name)
        return None


def bot_modules(skip: tuple[str, ...]) -> list[str]:
    import bot

    names = []
    for info in pkgutil.walk_packages(bot.__path__, "bot."):
        # Alembic's env.py and revision files run only inside Alembic, with its context set up.
        if info.name.startswith("bot.migrations") or info.name.startswith(skip):
            continue
        names.append(info.name)
    return names


async def build_apps(adapters: tuple[str, ...], workdir: Path) -> list[str]:
    from bot.bootstrap import build_core

    built = []
    config: dict[str, Any] = {
        "database": {"url": f"sqlite+aiosqlite:///{workdir / 'bot.db'}", "auto_migrate": True},
        "storage": {"dir": str(workdir / "images")},
        # The inference server backend is built (an HTTP client); nothing is sent to it.
        "backends": {"kind": "inference_server", "urls": ["http://127.0.0.1:9"]},
        "discord": {"sync_commands": False},
    }
    env: dict[str, str] = {}
    async with build_core(config, env, start_dispatcher=False) as core:
        built.append(f"core: backend {type(core.backend).__name__}, database {core.db.engine.url.drivername}")
        if "discord" in adapters:
            from bot.discord_adapter.bot import ImagineBot
            from bot.discord_adapter.config import DiscordConfig
            from bot.settings import load_section

            discord_bot = ImagineBot(
                core.service, load_section(config, "discord", DiscordConfig, environ=env)
            )
            await discord_bot.setup_hook()  # loads the cogs and registers the delivery
            commands = sorted(c.name for c in discord_bot.tree.get_commands())
            built.append(f"discord: commands {', '.join(commands)}")
            await discord_bot.close()
        if "slack" in adapters:
            import aiohttp

            from bot.settings import load_section
            from bot.slack_adapter.app import SlackAdapter
            from bot.slack_adapter.config import SlackConfig
            from bot.slack_adapter.runner import make_client

            cfg = load_section(config, "slack", SlackConfig, environ=env)
            async with aiohttp.ClientSession() as http:
                adapter = SlackAdapter(core.service, cfg, make_client("xoxb-not-a-token", cfg), http)
                app = adapter.build_app("not-a-secret")
                built.append(f"slack: bolt app {app.name!r}, {len(app._async_listeners)} listeners")
        if "playground" in adapters:
            from bot.playground.config import load_playground_config
            from bot.playground.delivery import WebDelivery
            from bot.playground.server import build_app

            cfg = load_playground_config(config, env)
            app = build_app(core.service, cfg, env, WebDelivery(core.service), workdir / "media")
            built.append(f"playground: {type(app).__name__} with {len(app.routes)} routes")
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--adapters", default=",".join(ADAPTERS), help="comma-separated: discord,slack,playground"
    )
    args = parser.parse_args(argv)
    adapters = tuple(a for a in args.adapters.split(",") if a)
    unknown = set(adapters) - set(ADAPTERS)
    if unknown:
        parser.error(f"unknown adapters: {', '.join(sorted(unknown))}")

    blocker = Blocked()
    sys.meta_path.insert(0, blocker)
    skip = tuple(
        f"bot.{'playground' if a == 'playground' else a + '_adapter'}" for a in ADAPTERS if a not in adapters
    )
    modules = bot_modules(skip)
    for name in modules:
        importlib.import_module(name)
    print(f"imported {len(modules)} bot modules")
    with tempfile.TemporaryDirectory() as tmp:
        for line in asyncio.run(build_apps(adapters, Path(tmp))):
            print(line)
    if blocker.attempts:  # an import that was tried and swallowed (an optional dependency check)
        print(f"the bot tried to import: {', '.join(sorted(set(blocker.attempts)))}", file=sys.stderr)
        return 1
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    if loaded:
        print(f"loaded anyway: {', '.join(loaded)}", file=sys.stderr)
        return 1
    print(f"none of {', '.join(BLOCKED)} imported")
    return 0


if __name__ == "__main__":
    sys.exit(main())
