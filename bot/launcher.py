"""`python -m bot.launcher` (= `make run`): everything a newcomer needs, in one terminal.

1. Loads `.env`; makes sure there is an `INFERENCE_API_TOKEN` (generated once into
   `data/.inference_token` when none is set) shared by the bot and the inference server.
2. Migrates the database (`python -m bot.migrate`).
3. Prints which adapters are on or off and why (the web playground is always on).
4. Runs the processes of the `Procfile` with honcho (a Procfile runner): the inference server on the
   configured model (the embedded one by default) and the bot with its adapters. Every line is
   labelled with its process; when the playground answers, prints its URL.
5. Ctrl-C (SIGINT) or SIGTERM: honcho sends SIGTERM to every process; the bot hands the jobs in
   flight back to the queue in the database, and the next start finishes them.

The inference server is skipped when `[backends] kind` is not "inference_server" (e.g. "fake").
Its config and model are checked first by `python -m inference_server --check-config`: the bot
never imports the server package, which a bot-only install has without its dependencies.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROCFILE = REPO / "Procfile"
TOKEN_FILE = Path("data") / ".inference_token"
LABEL = "launcher"
# How long to wait for the playground (and the model) before saying something is slow; the
# embedded model loads in seconds, a real checkpoint on CPU can take minutes.
READY_PATIENCE_S = 180.0
# The server's config check imports its config and pipeline modules (about a second); a minute means
# something is wrong with the Python environment, not with the config.
SERVER_CHECK_TIMEOUT_S = 60.0


def ensure_token(env: MutableMapping[str, str], token_file: Path = TOKEN_FILE) -> str:
    """INFERENCE_API_TOKEN from the environment, else from `token_file`, else a new one saved there
    (mode 0600) so the next run and a separately started server agree on it."""
    token = env.get("INFERENCE_API_TOKEN", "").strip()
    if token:
        return "environment"
    if token_file.is_file():
        token = token_file.read_text().strip()
    if token:
        env["INFERENCE_API_TOKEN"] = token
        return str(token_file)
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    env["INFERENCE_API_TOKEN"] = token
    return f"{token_file} (new)"


def read_procfile(path: Path = PROCFILE) -> dict[str, str]:
    from honcho.environ import parse_procfile

    return dict(parse_procfile(path.read_text()).processes)


@dataclass(frozen=True)
class ServerPlan:
    """What the inference server says it would serve (`python -m inference_server --check-config`)."""

    host: str
    port: int
    model: str


class ServerCheckFailed(RuntimeError):
    """The inference server refused its config or model; the message is its own."""


def check_server(config_file: Path, env: Mapping[str, str]) -> ServerPlan:
    """Ask the inference server what it would serve. It validates its own config sections and the
    model source in a subprocess, so the bot never imports the server package (a bot-only install
    has none of torch, diffusers or transformers)."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "inference_server", "--check-config", "--config", str(config_file)],
            env=dict(env), capture_output=True, text=True, check=False, timeout=SERVER_CHECK_TIMEOUT_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise ServerCheckFailed(f"its config check did not answer in {SERVER_CHECK_TIMEOUT_S:g} s") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()] or [
            f"exit status {done.returncode}"
        ]
        raise ServerCheckFailed(lines[-1].removeprefix("inference_server: "))
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    return ServerPlan(host=answer["host"], port=int(answer["port"]), model=answer["model"])


class Plan:
    """What the launcher will run, worked out from the config and environment before starting."""

    def __init__(self, config_file: Path, env: MutableMapping[str, str]):
        from bot.__main__ import adapter_plan
        from bot.backends import load_backends_config
        from bot.playground.config import load_playground_config
        from bot.settings import read_toml

        self.config_file = config_file
        raw = read_toml(config_file)
        self.backends = load_backends_config(raw, env)
        self.playground = load_playground_config(raw, env)
        self.run_server = self.backends.kind == "inference_server"
        self.adapters = adapter_plan(env)
        self.server: ServerPlan | None = None

    @property
    def server_url(self) -> str:
        assert self.server is not None
        host = "127.0.0.1" if self.server.host in ("0.0.0.0", "::") else self.server.host
        return f"http://{host}:{self.server.port}"

    @property
    def playground_url(self) -> str | None:
        from bot.playground.server import url_for

        return url_for(self.playground, self.playground.port) if self.playground.port else None


def port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback only
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, ValueError):
        return 0


def watch_ready(plan: Plan, say: Callable[[str], None], stop: threading.Event) -> None:
    """Print the playground URL once it (and the inference server) answer."""
    start = time.monotonic()
    warned = False
    server_ready = not plan.run_server
    while not stop.is_set():
        if not server_ready and _get(plan.server_url + "/ready") == 200:
            server_ready = True
            say(f"inference server ready at {plan.server_url}")
        url = plan.playground_url
        ui_ready = url is not None and _get(url + "healthz") == 200
        if server_ready and ui_ready:
            say("")
            say(f"  ready: open {url} in your browser  (Ctrl-C stops everything)")
            say("")
            return
        if not warned and time.monotonic() - start > READY_PATIENCE_S:
            warned = True
            say("still starting after 3 minutes: see the server and bot lines above")
        # Every 2 s: the server logs each probe, and a person does not notice 2 s.
        stop.wait(2.0)


def main(argv: list[str] | None = None) -> int:
    from dotenv import dotenv_values
    from honcho.manager import Manager
    from honcho.printer import Message, Printer

    from bot.settings import ConfigError, config_path

    parser = argparse.ArgumentParser(prog="python -m bot.launcher", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="config file (default $IMAGINE_CONFIG or ./config.toml)")
    args = parser.parse_args(argv)

    printer = Printer(sys.stdout)
    printer.width = len(LABEL)

    def say(text: str) -> None:
        printer.write(Message(type="line", data=text + "\n" if text else " \n", time=dt.datetime.now(),
                              name=LABEL, colour=None))  # fmt: skip

    env: dict[str, str] = {k: v for k, v in dotenv_values(".env").items() if v is not None}
    env.update(os.environ)  # the real environment wins over .env, as in python-dotenv's load_dotenv
    config_file = config_path(args.config or env.get("IMAGINE_CONFIG")).resolve()
    env["IMAGINE_CONFIG"] = str(config_file)
    try:
        plan = Plan(config_file, env)
    except ConfigError as e:
        say(f"config error: {e}")
        return 2

    if plan.run_server:
        try:
            plan.server = check_server(config_file, env)
        except ServerCheckFailed as e:
            say(f"cannot start the inference server: {e}")
            say("to try the bot without a model: IMAGINE_BACKENDS_KIND=fake make run (placeholder images)")
            return 2
        source = ensure_token(env)
        say(f"INFERENCE_API_TOKEN from {source}")
        # The bot talks to the server started here, unless the URLs were set explicitly.
        env.setdefault("IMAGINE_BACKENDS_URLS", json.dumps([plan.server_url]))

    listeners = [("[playground]", plan.playground.host, plan.playground.port, "IMAGINE_PLAYGROUND_PORT",
                  plan.playground.enabled)]  # fmt: skip
    if plan.server is not None:
        listeners.append(
            ("[inference_server]", plan.server.host, plan.server.port, "IMAGINE_INFERENCE_SERVER_PORT", True)
        )
    busy = [
        f"{where} {host}:{port} is in use (another `make run`?); set {var} to a free port"
        for where, host, port, var, needed in listeners
        if needed and port and not port_free(host, port)
    ]
    for message in busy:
        say(message)
    if busy:
        return 2

    # Child processes are Python: unbuffered, so their lines show up as they are written.
    env["PYTHONUNBUFFERED"] = "1"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"

    say("migrating the database")
    migrated = subprocess.run(
        [sys.executable, "-m", "bot.migrate", "--config", str(config_file)],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if migrated.returncode != 0:
        for line in (migrated.stdout + migrated.stderr).splitlines():
            say(f"migrate: {line}")
        say("migration failed; not starting")
        return migrated.returncode
    for line in migrated.stdout.splitlines():
        say(f"migrate: {line}")

    say(
        f"inference server: {'on, model ' + plan.server.model if plan.server else 'off: [backends] kind = ' + plan.backends.kind}"
    )  # noqa: E501
    for name, _module, on, why in plan.adapters:
        say(
            f"adapter {name}: {why if why.startswith(('on', 'off')) else ('on' if on else 'off') + ': ' + why}"
        )

    processes = read_procfile()
    if not plan.run_server:
        processes.pop("server", None)
    manager = Manager(printer=printer)
    for name, cmd in processes.items():
        manager.add_process(name, cmd, env=env, cwd=os.getcwd())
    printer.width = max(printer.width, len(LABEL))

    stop = threading.Event()
    watcher = threading.Thread(target=watch_ready, args=(plan, say, stop), daemon=True)
    watcher.start()
    try:
        manager.loop()
    finally:
        stop.set()
    say("all processes stopped; jobs in flight stay queued in the database for the next start")
    return manager.returncode or 0


if __name__ == "__main__":
    sys.exit(main())
