"""`[playground]` of config.toml, as a frozen dataclass validated at start-up."""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bot.settings import ConfigError, load_section

# The platform name of playground jobs, users and quotas in the core's tables.
PLATFORM = "web"
# Login names become user ids in the database and appear in admin commands: keep them plain.
USERNAME_RE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
# The secrets that guard an exposed playground, from the environment.
PASSWORD_VARS = ("PLAYGROUND_PASSWORD", "PLAYGROUND_ADMIN_PASSWORD")
# A password is compared in full; this bounds what a login form may make the server hash and compare.
MAX_PASSWORD_CHARS = 1024


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
        # The local user is a user id in the database, like a login name.
        _check(
            USERNAME_RE.fullmatch(self.local_user) is not None,
            "local_user",
            "must be a name of 1-64 of A-Z a-z 0-9 _ . @ - (no ':')",
        )
        for name in self.admin_users:
            _check(
                isinstance(name, str) and USERNAME_RE.fullmatch(name) is not None,
                "admin_users",
                f"{name!r} is not a login name (1-64 of A-Z a-z 0-9 _ . @ -)",
            )
        _check(1 <= self.history_limit <= 100, "history_limit", "must be from 1 to 100")
        _check(1 <= self.concurrency_limit <= 1000, "concurrency_limit", "must be from 1 to 1000")
        _check(
            math.isfinite(self.poll_interval_s) and 0 < self.poll_interval_s <= 600,
            "poll_interval_s",
            "must be > 0 and <= 600 seconds",
        )
        _check(len(self.title) <= 200, "title", "at most 200 characters")

    @property
    def exposed(self) -> bool:
        return not is_loopback(self.host)


def check_passwords(env: Mapping[str, str]) -> None:
    """Refuse passwords nobody could type or everybody could guess. Empty means "not set"; a value of
    only spaces is a mistake (a template line, a stray space), not a password, so it is refused
    instead of guarding the playground with a blank. The admin password must differ from the users'
    one, or every user could sign in as an admin."""
    for var in PASSWORD_VARS:
        value = env.get(var) or ""
        if not value:
            continue
        if not value.strip():
            raise ConfigError(f"{var}: is only whitespace; set a real password or leave it empty (unset)")
        if len(value) > MAX_PASSWORD_CHARS:
            raise ConfigError(f"{var}: longer than {MAX_PASSWORD_CHARS} characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # os.environ turns bytes that are not UTF-8 into lone surrogates: no browser can send them.
            raise ConfigError(f"{var}: is not valid UTF-8 text (check the encoding of .env)") from None
    password, admin = env.get("PLAYGROUND_PASSWORD") or "", env.get("PLAYGROUND_ADMIN_PASSWORD") or ""
    if admin and admin == password:
        raise ConfigError(
            "PLAYGROUND_ADMIN_PASSWORD: must differ from PLAYGROUND_PASSWORD, or every user could sign in "
            "as an admin"
        )


def load_playground_config(raw: Mapping[str, Any] | None, env: Mapping[str, str]) -> PlaygroundConfig:
    """Load `[playground]`, check the passwords, and refuse an exposed playground without one."""
    cfg = load_section(raw, "playground", PlaygroundConfig, environ=env)
    check_passwords(env)
    if cfg.exposed and not env.get("PLAYGROUND_PASSWORD"):
        raise ConfigError(
            f"[playground] host = {cfg.host!r} exposes the playground on the network: set "
            'PLAYGROUND_PASSWORD (environment or .env), or keep host = "127.0.0.1"'
        )
    return cfg
