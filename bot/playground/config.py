"""`[playground]` of config.toml, as a frozen dataclass validated at start-up."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from inference_server.config_loader import ConfigError, load_section

# The platform name of playground jobs, users and quotas in the core's tables.
PLATFORM = "web"


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"[playground] {key}: {message}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class PlaygroundConfig:
    # false: `python -m bot` leaves the playground off (same as IMAGINE_PLAYGROUND_ENABLED=false).
    enabled: bool = True
    # Loopback by default: anything else exposes the playground and needs PLAYGROUND_PASSWORD.
    host: str = "127.0.0.1"
    # 7860 is Gradio's usual port, so the URL looks familiar; 0 = any free port.
    port: int = 7860
    # The user id of the single local user when no password is set (jobs, quota and history of
    # "web:<user_id>" in the database). That user is an admin: only this machine can reach it.
    local_user: str = "local"
    # With PLAYGROUND_PASSWORD: these login names are admins and must sign in with
    # PLAYGROUND_ADMIN_PASSWORD (without it nobody is an admin on an exposed playground).
    admin_users: list[str] = field(default_factory=list)
    # Images shown in the history gallery (the core caps history at 100 jobs).
    history_limit: int = 40
    # Browser requests handled at once per button; waiting on a job is cheap, and the core's own
    # queue (not Gradio's) decides the order of generations.
    concurrency_limit: int = 16
    # Seconds between looks at a job's row when no progress event came (a job delivered by another
    # process sharing the database, or an event missed while submitting).
    poll_interval_s: float = 1.0
    # Page title shown in the browser tab and the header.
    title: str = "imagine playground"

    def __post_init__(self) -> None:
        _check(bool(self.host), "host", "must not be empty")
        _check(0 <= self.port <= 65535, "port", "must be from 0 to 65535")
        _check(
            bool(self.local_user) and ":" not in self.local_user, "local_user", "must be a name without ':'"
        )
        _check(1 <= self.history_limit <= 100, "history_limit", "must be from 1 to 100")
        _check(1 <= self.concurrency_limit <= 1000, "concurrency_limit", "must be from 1 to 1000")
        _check(self.poll_interval_s > 0, "poll_interval_s", "must be > 0")

    @property
    def exposed(self) -> bool:
        return not is_loopback(self.host)


def load_playground_config(raw: Mapping[str, Any] | None, env: Mapping[str, str]) -> PlaygroundConfig:
    """Load `[playground]` and refuse an exposed playground without a password."""
    cfg = load_section(raw, "playground", PlaygroundConfig, environ=env)
    if cfg.exposed and not env.get("PLAYGROUND_PASSWORD"):
        raise ConfigError(
            f"[playground] host = {cfg.host!r} exposes the playground on the network: set "
            'PLAYGROUND_PASSWORD (environment or .env), or keep host = "127.0.0.1"'
        )
    return cfg
