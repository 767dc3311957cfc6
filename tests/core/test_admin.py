"""Admin operations: each works for an admin, is refused (NotAdmin) without the flag, and is written
to the audit log; stats count jobs per state, images today and the top users."""

from __future__ import annotations

import pytest

from bot.backends.base import BackendRejected
from bot.backends.fake import FakeBackend
from bot.core.api import Actor, BadParameters, NotAdmin, Place
from tests.core.helpers import ADMIN, ALICE, BOB, GUILD, running_core

OPERATIONS = [
    ("usage", lambda s, a: s.usage(a, GUILD, "bob")),
    ("set_user_limit", lambda s, a: s.set_user_limit(a, "bob", 3)),
    ("set_guild_limit", lambda s, a: s.set_guild_limit(a, "guild1", 7)),
    ("grant_credits", lambda s, a: s.grant_credits(a, "bob", 5)),
    ("reset_usage", lambda s, a: s.reset_usage(a, "bob")),
    ("ban", lambda s, a: s.ban(a, "bob", "spam")),
    ("unban", lambda s, a: s.unban(a, "bob")),
    ("stats", lambda s, a: s.stats(a, GUILD)),
]


async def test_every_admin_operation_is_refused_without_the_flag_and_audited(db_url, tmp_path):
    async with running_core(db_url, tmp_path, start=False) as (core, _):
        for name, op in OPERATIONS:
            with pytest.raises(NotAdmin) as err:
                await op(core.service, ALICE)
            assert name in err.value.message
        with pytest.raises(NotAdmin):
            await core.service.audit_log(ALICE)
        # Nothing changed for bob
        q = await core.service.quota(BOB, GUILD)
        assert (q.daily_limit, q.bonus_credits, q.banned, q.limit_source) == (25, 0, False, "global")
        for _name, op in OPERATIONS:
            await op(core.service, ADMIN)
        entries = await core.service.audit_log(ADMIN, limit=100)
        actions = [e.action for e in reversed(entries)]
        assert actions == [f"refused:{n}" for n, _ in OPERATIONS] + ["refused:audit_log"] + [
            n for n, _ in OPERATIONS
        ]
        ban = next(e for e in entries if e.action == "ban")
        assert (ban.actor_user_id, ban.target, ban.details) == ("root", "user:bob", {"reason": "spam"})
        refused = next(e for e in entries if e.action == "refused:grant_credits")
        assert refused.actor_user_id == "alice"


async def test_admin_operations_take_effect(db_url, tmp_path):
    async with running_core(db_url, tmp_path, start=False, quotas={"daily_limit": 2}) as (core, _):
        s = core.service
        await s.imagine(BOB, GUILD, "x --n 2", idempotency_key="1")
        q = await s.usage(ADMIN, GUILD, "bob")
        assert (q.used_today, q.remaining) == (2, 0)
        q = await s.set_user_limit(ADMIN, "bob", 5)
        assert (q.daily_limit, q.remaining_today, q.limit_source) == (5, 3, "user")
        q = await s.grant_credits(ADMIN, "bob", 4)
        assert (q.bonus_credits, q.remaining) == (4, 7)
        q = await s.reset_usage(ADMIN, "bob")
        assert (q.used_today, q.remaining) == (0, 9)
        await s.set_guild_limit(ADMIN, "guild1", 1)
        q = await s.quota(ALICE, GUILD)
        assert (q.daily_limit, q.limit_source) == (1, "guild")
        await s.set_guild_limit(ADMIN, "guild1", None)
        assert (await s.quota(ALICE, GUILD)).limit_source == "global"
        await s.ban(ADMIN, "carol", "")  # a user never seen before can be banned
        assert (await s.usage(ADMIN, GUILD, "carol")).banned
        await s.unban(ADMIN, "carol")
        assert not (await s.usage(ADMIN, GUILD, "carol")).banned
        for bad in (lambda: s.grant_credits(ADMIN, "bob", 0), lambda: s.set_user_limit(ADMIN, "bob", -1)):
            with pytest.raises(BadParameters):
                await bad()
        with pytest.raises(BadParameters):
            await s.ban(ADMIN, "root")  # not yourself


async def test_stats(db_url, tmp_path):
    backend = FakeBackend()
    backend.fail_next(1, BackendRejected("nope"))
    async with running_core(db_url, tmp_path, backend=backend, bot={"dispatch_concurrency": 1}) as (core, _):
        s = core.service
        failed = await s.imagine(ALICE, GUILD, "will fail", idempotency_key="f")
        await s.wait_for_job(failed.id, 30)
        jobs = [
            await s.imagine(ALICE, GUILD, "a --n 3", idempotency_key="a"),
            await s.imagine(BOB, GUILD, "b", idempotency_key="b"),
            await s.imagine(BOB, Place("discord", "guild2", "c"), "b2 --n 4", idempotency_key="b2"),
        ]
        for j in jobs:
            assert (await s.wait_for_job(j.id, 30)).state == "succeeded"
        await s.imagine(Actor("slack", "U1", "u"), Place("slack", "T", "C"), "slack", idempotency_key="sl")
        stats = await s.stats(ADMIN, GUILD)
        assert stats.jobs_by_state == {"queued": 0, "running": 0, "succeeded": 2, "failed": 1, "cancelled": 0}
        assert stats.images_today == 4
        assert [(u.user_id, u.images) for u in stats.top_users] == [("alice", 3), ("bob", 1)]
        everywhere = await s.stats(ADMIN, Place("discord", None, None))
        assert everywhere.images_today == 8 and everywhere.top_users[0].user_id == "bob"
        assert everywhere.queue_depth == 1  # the Slack job: no Slack delivery in this process
