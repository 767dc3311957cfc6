"""Every value an adapter passes to the core is checked before the database sees it: text it could
not store (NUL, lone surrogates, control characters), ids longer than their column, malformed
mappings and numbers. Each is refused with BadParameters naming the field, on SQLite and PostgreSQL
alike (where the drivers fail differently), and nothing is written. What fails on the database's side
anyway comes out as the core's DatabaseError, never as a driver exception."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from bot.config import load_core_config
from bot.core.api import Actor, BadParameters, DatabaseError, Place
from bot.core.db import Database, make_engine
from bot.core.models import AuditLog, Job, User
from bot.core.service import CoreService
from bot.core.storage import LocalImageStorage
from tests.core.helpers import ADMIN, ALICE, GUILD, running_core

SURROGATE = "\ud800"


def submissions(svc):
    """(expected field, a call) for every kind of bad input, across every submitting method."""
    A, G = ALICE, GUILD
    yield "prompt", lambda: svc.imagine(A, G, f"a {SURROGATE} cat", idempotency_key="p1")
    yield "prompt", lambda: svc.imagine(A, G, "a \x00 cat", idempotency_key="p2")
    yield "prompt", lambda: svc.imagine(A, G, 42, idempotency_key="p3")
    yield "no", lambda: svc.imagine(A, G, "a cat --no rain\x00", idempotency_key="p4")
    yield "seed", lambda: svc.imagine(A, G, f"a cat --seed 1{SURROGATE}", idempotency_key="p5")
    yield "negative", lambda: svc.imagine(A, G, "a cat", {"negative": f"x{SURROGATE}"}, idempotency_key="p6")
    yield "prompt", lambda: svc.imagine(A, G, "x", {"prompt": "a\x00b"}, idempotency_key="p7")
    yield "seed", lambda: svc.imagine(A, G, "a cat", {"seed": [1, 2]}, idempotency_key="p8")
    yield "guidance", lambda: svc.imagine(A, G, "a cat", {"guidance": 10**400}, idempotency_key="p9")
    yield "options", lambda: svc.imagine(A, G, "a cat", {1: "x"}, idempotency_key="p10")
    yield "options", lambda: svc.imagine(A, G, "a cat", ["seed", 1], idempotency_key="p11")
    yield "user", lambda: svc.imagine(Actor("discord", "u" * 65), G, "a cat", idempotency_key="u1")
    yield "user", lambda: svc.imagine(Actor("discord", "u\x00"), G, "a cat", idempotency_key="u2")
    yield "user", lambda: svc.imagine(Actor("discord", ""), G, "a cat", idempotency_key="u3")
    yield (
        "platform",
        lambda: svc.imagine(Actor(f"d{SURROGATE}", "u"), Place(f"d{SURROGATE}"), "x", idempotency_key="u4"),
    )
    yield (
        "guild",
        lambda: svc.imagine(A, Place("discord", f"g{SURROGATE}", "c"), "a cat", idempotency_key="g1"),
    )
    yield "channel", lambda: svc.imagine(A, Place("discord", "g", "c" * 65), "a cat", idempotency_key="g2")
    yield "place", lambda: svc.imagine(A, Place("slack", "g", "c"), "a cat", idempotency_key="g3")
    yield "idempotency_key", lambda: svc.imagine(A, G, "a cat", idempotency_key="k\x00")
    yield "idempotency_key", lambda: svc.imagine(A, G, "a cat", idempotency_key="k" * 151)
    yield "idempotency_key", lambda: svc.imagine(A, G, "a cat", idempotency_key=f"k{SURROGATE}")
    yield "delivery", lambda: svc.imagine(A, G, "a cat", idempotency_key="d1", delivery={"c": "C\x00"})
    yield "delivery", lambda: svc.imagine(A, G, "a cat", idempotency_key="d2", delivery={"c": SURROGATE})
    yield "delivery", lambda: svc.imagine(A, G, "a cat", idempotency_key="d3", delivery={"c": object()})
    yield "delivery", lambda: svc.imagine(A, G, "a cat", idempotency_key="d4", delivery={"c": "x" * 20000})
    yield "delivery", lambda: svc.imagine(A, G, "a cat", idempotency_key="d5", delivery={"c": float("nan")})
    yield "prompt", lambda: svc.inpaint(A, G, f"a {SURROGATE}", b"png", None, idempotency_key="i1")
    yield "image", lambda: svc.inpaint(A, G, "a hat", "not bytes", None, idempotency_key="i2")
    yield "message", lambda: svc.react(A, G, "m\x00", "🔁", idempotency_key="r1")
    yield "message", lambda: svc.react(A, G, "m" * 101, "🔁", idempotency_key="r2")
    yield "job", lambda: svc.reroll(A, G, job_id=2**70, idempotency_key="r3")
    yield "job", lambda: svc.reroll(A, G, job_id="5", idempotency_key="r4")
    yield "job", lambda: svc.variation(A, G, 0, job_id=True, idempotency_key="r5")
    yield "job", lambda: svc.reroll(A, G, idempotency_key="r6")
    yield "image", lambda: svc.variation(A, G, "0", job_id=1, idempotency_key="r7")
    yield "message", lambda: svc.reroll(A, G, message_id=f"m{SURROGATE}", idempotency_key="r8")


def other_calls(svc):
    A, G, X = ALICE, GUILD, ADMIN
    yield "job", lambda: svc.cancel(A, 2**64)
    yield "job", lambda: svc.get_job(-1)
    yield "job", lambda: svc.attach_result_message(2**63, "m")
    yield "message", lambda: svc.attach_result_message(1, "m" * 101)
    yield "channel", lambda: svc.attach_result_message(1, "m", "c\x00")
    yield "delivery", lambda: svc.remember_delivery(1, {"status_ts": "1\x00"})
    yield "message", lambda: svc.job_for_message("discord", f"m{SURROGATE}")
    yield "limit", lambda: svc.history(A, "ten")
    yield "user", lambda: svc.quota(Actor("discord", "a b"), G)
    yield "user", lambda: svc.usage(X, G, "u\x00")
    yield "user", lambda: svc.set_user_limit(X, "u" * 65, 5)
    yield "guild", lambda: svc.set_guild_limit(X, "", 5)
    yield "user", lambda: svc.grant_credits(X, f"u{SURROGATE}", 5)
    yield "user", lambda: svc.reset_usage(X, "u\x00")
    yield "reason", lambda: svc.ban(X, "bob", f"spam {SURROGATE}")
    yield "reason", lambda: svc.ban(X, "bob", "x" * 501)
    yield "user", lambda: svc.unban(X, "")
    yield "top", lambda: svc.stats(X, G, float("inf"))
    yield "limit", lambda: svc.audit_log(X, "all")
    # Refused before the admin check: a non-admin's refusal is audited, with the target it named.
    yield "user", lambda: svc.ban(ALICE, "u\x00", "")


async def test_bad_input_is_refused_naming_the_field_and_nothing_is_stored(db_url, tmp_path):
    async with running_core(db_url, tmp_path, start=False) as (core, _):
        svc = core.service
        for field, call in [*submissions(svc), *other_calls(svc)]:
            with pytest.raises(BadParameters) as err:
                await call()
            assert err.value.field == field, (field, err.value.field, err.value.message)
            assert err.value.message and "Traceback" not in err.value.message
        async with core.db.read() as s:
            for table in (Job, User, AuditLog):
                assert (await s.execute(select(func.count()).select_from(table))).scalar_one() == 0, table
        assert (await svc.quota(ALICE, GUILD)).used_today == 0


async def test_display_names_are_cleaned_not_refused(db_url, tmp_path):
    """A display name comes from the platform, not from what the user asked: an odd one must not
    lock its owner out. Control characters and surrogates go, the length is cut to the column."""
    async with running_core(db_url, tmp_path, start=False) as (core, _):
        odd = Actor("discord", "alice", f"Al\x00i{SURROGATE}ce\n" + "x" * 500)
        job = await core.service.imagine(odd, GUILD, "a cat", idempotency_key="n1")
        assert job.display_name.startswith("Alice") and len(job.display_name) == 200


async def test_database_failures_are_core_errors(tmp_path):
    """Past the checks, a database that fails still answers with the core's DatabaseError (which the
    adapters map to a message), never with a driver exception reaching their catch-all."""
    config = load_core_config({"storage": {"dir": str(tmp_path / "images")}}, {})
    unreachable = Database(make_engine("postgresql+asyncpg://postgres@127.0.0.1:1/none"))
    schemaless = Database(make_engine(f"sqlite+aiosqlite:///{Path(tmp_path) / 'empty.db'}"))
    for db in (unreachable, schemaless):
        svc = CoreService(db, LocalImageStorage(tmp_path / "images"), config)
        try:
            with pytest.raises(DatabaseError) as err:
                await svc.imagine(ALICE, GUILD, "a cat", idempotency_key="x")
            assert "database" in err.value.message
            with pytest.raises(DatabaseError):
                await svc.quota(ALICE, GUILD)
        finally:
            await db.close()
    assert err.value.kind in ("unavailable", "error")
