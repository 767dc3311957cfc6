"""`python -m inference_server`: load config and .env, build the app, serve until SIGINT/SIGTERM.

`--check-config` only validates the config and the model source and prints, as one JSON line, what
would be served: the launcher of `make run` asks this way, so the bot never imports this package.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import os
import sys

from aiohttp import web
from aiohttp.web_runner import GracefulExit

from inference_server import keys
from inference_server.config import load_config
from inference_server.config_loader import ConfigError, config_path
from inference_server.pipelines import ModelLoadError, check_model_source

log = logging.getLogger("inference_server")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m inference_server", description="Batched diffusion inference server (HTTP API v1)."
    )
    parser.add_argument("--config", help="config file (default: $IMAGINE_CONFIG or ./config.toml)")
    parser.add_argument("--host", help="override [inference_server] host")
    parser.add_argument("--port", type=int, help="override [inference_server] port")
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the config and the model source, print host, port and model as JSON, and exit",
    )
    return parser.parse_args(argv)


# What serving needs beyond what the bot installs: the `server` extra (pyproject.toml).
SERVER_MODULES = ("torch", "diffusers", "transformers", "accelerate", "safetensors")


def missing_server_modules() -> list[str]:
    return [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_server_modules()
    if missing:
        # A bot-only install (the discord/slack/playground extras) has this package but not its
        # dependencies: say so instead of an ImportError traceback.
        print(
            f"inference_server: {', '.join(missing)} not installed: install the server extra "
            "(pip install 'imagine-bot[server]', or `make setup`)",
            file=sys.stderr,
        )
        return 2
    from dotenv import load_dotenv

    load_dotenv()  # secrets such as INFERENCE_API_TOKEN may live in .env
    # Loading bars are noise in a server log; the log line after loading says what was loaded.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from diffusers.utils import logging as diffusers_logging

    from inference_server.app import create_app, runner_options

    diffusers_logging.disable_progress_bar()
    try:
        config = load_config(config_path(args.config))
        overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
        if overrides:
            config = config.replace(server=overrides)
        logging.basicConfig(
            level=config.server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        # Every model of the registry, before anything loads: a missing folder or file, a .ckpt
        # without allow_ckpt, a single file without its config folder fail here, naming the table.
        for name, model in config.model_entries().items():
            section = f"models.{name}" if name in config.models else "model"
            check_model_source(model, allow_ckpt=config.registry.allow_ckpt, section=section)
        if args.check_config:
            print(
                json.dumps(
                    {"host": config.server.host, "port": config.server.port, "model": config.model.path}
                )
            )
            return 0
        app = create_app(config)
    except (ConfigError, ModelLoadError) as e:
        print(f"inference_server: {e}", file=sys.stderr)
        return 2

    failed: list[BaseException] = []

    def on_fatal(error: BaseException) -> None:
        # Loading failed after start-up: stop the server (GracefulExit unwinds run_app) and exit 1.
        failed.append(error)
        log.critical("cannot serve: %s", error)

        def stop() -> None:
            raise GracefulExit()

        asyncio.get_running_loop().call_soon(stop)

    app[keys.ON_FATAL] = on_fatal
    web.run_app(
        app,
        host=config.server.host,
        port=config.server.port,
        **runner_options(config),
        access_log=logging.getLogger("aiohttp.access"),
        print=lambda msg: log.info("%s", msg),
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
