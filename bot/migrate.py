"""Database migrations: `python -m bot.migrate` (= `make migrate`) upgrades to the newest schema;
`--downgrade REV` goes back (`base` = empty); `--status` prints where the database stands.

Alembic is configured here in code (script_location = the top-level `migrations/`, shipped in the package through the link `bot/migrations`),
so there is no alembic.ini to keep in sync. The same functions are used at start-up: the bot refuses to run on a
database that is behind the code, unless `[database] auto_migrate = true`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Mapping
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

log = logging.getLogger("bot.migrate")


class SchemaOutOfDate(RuntimeError):
    """The database schema is not the one this code expects; the message says what to run."""


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "migrations/ has no revisions"
    return head


def _current(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        return await conn.run_sync(_current)


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    await _run(engine, lambda cfg: command.upgrade(cfg, revision))


async def downgrade(engine: AsyncEngine, revision: str) -> None:
    await _run(engine, lambda cfg: command.downgrade(cfg, revision))


async def _run(engine: AsyncEngine, fn) -> None:  # type: ignore[no-untyped-def]
    def go(conn: Connection) -> None:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        fn(cfg)

    async with engine.begin() as conn:
        await conn.run_sync(go)


async def ensure_schema(engine: AsyncEngine, *, auto_migrate: bool) -> str:
    """Return the current revision if it is the head; migrate (auto_migrate) or raise otherwise."""
    head = head_revision()
    current = await current_revision(engine)
    if current == head:
        return current
    if auto_migrate:
        log.info("database at revision %s, upgrading to %s ([database] auto_migrate = true)", current, head)
        await upgrade(engine)
        return head
    script = ScriptDirectory.from_config(alembic_config())
    known = {rev.revision for rev in script.walk_revisions()}
    if current is not None and current not in known:
        raise SchemaOutOfDate(
            f"the database is at schema revision {current}, which this code does not know (it expects "
            f"{head}): the database is newer than the code; upgrade the bot"
        )
    where = "empty (no schema yet)" if current is None else f"at schema revision {current}"
    raise SchemaOutOfDate(
        f"the database is {where} but this code needs revision {head}: run `make migrate` "
        "(or set [database] auto_migrate = true)"
    )


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    from dotenv import load_dotenv

    from bot.config import load_core_config
    from bot.core.db import make_engine
    from bot.settings import ConfigError, config_path

    parser = argparse.ArgumentParser(prog="python -m bot.migrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="config file (default $IMAGINE_CONFIG or ./config.toml)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--downgrade", metavar="REV", help="downgrade to REV (e.g. -1, base, a revision id)")
    group.add_argument("--status", action="store_true", help="print the current and the head revision")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # set-up noise
    load_dotenv()
    import os

    env = os.environ if env is None else env
    path = config_path(args.config)
    try:
        cfg = load_core_config(path if path.exists() else None, env)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    async def go() -> int:
        engine = make_engine(
            cfg.database_url, pool_size=2, sqlite_busy_timeout_s=cfg.database.sqlite_busy_timeout_s
        )
        try:
            before = await current_revision(engine)
            if args.status:
                print(f"current: {before or '(empty)'}  head: {head_revision()}")
                return 0
            if args.downgrade:
                await downgrade(engine, args.downgrade)
            else:
                await upgrade(engine)
            after = await current_revision(engine)
            print(f"database {_safe_url(cfg.database_url)}: {before or '(empty)'} -> {after or '(empty)'}")
            return 0
        finally:
            await engine.dispose()

    return asyncio.run(go())


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


if __name__ == "__main__":
    sys.exit(main())
