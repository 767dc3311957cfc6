"""Channel and role settings on a real database (SQLite file and PostgreSQL): allowed channels,
per-role daily limits (the highest wins, a per-user limit wins over them, exact under concurrent
submissions), a channel's defaults under the prompt's flags, private mode, and the audit log."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from sqlalchemy import func, select

from bot.core.api import (
    Actor,
    BadParameters,
    ChannelDefaults,
    NotAdmin,
    NotAllowedHere,
    Place,
    QuotaExceeded,
)
from bot.core.model_choice import ModelCatalog
from bot.core.models import ChannelSettings, Job, QuotaUsage
from tests.core.helpers import ADMIN, ALICE, BOB, GUILD, running_core
from tests.core.test_models import SD15, SDXL

ART = Place("discord", "guild1", "art")
BOTS = Place("discord", "guild1", "bots")


async def test_allowed_channels_refuse_elsewhere_naming_where_and_empty_means_everywhere(db_url, tmp_path):
    async with running_core(db_url, tmp_path) as (core, _):
        s = core.service
        listing = await s.allow_channels(ADMIN, GUILD, ["art", "bots", "art"])
        assert listing.allowed_channels == ("art", "bots")
        with pytest.raises(NotAllowedHere) as e:
            await s.imagine(ALICE, GUILD, "a fox", idempotency_key="k1")
        assert e.value.channels == ("art", "bots")
        assert (
            e.value.message == "Image commands are not allowed in this channel. Use them in <#art>, <#bots>."
        )
        job = await s.wait_for_job((await s.imagine(ALICE, ART, "a fox", idempotency_key="k2")).id, 30)
        # Follow-ups (buttons, reactions) in another channel are refused the same way.
        with pytest.raises(NotAllowedHere):
            await s.reroll(ALICE, GUILD, job_id=job.id, idempotency_key="k3")
        assert (await s.reroll(ALICE, BOTS, job_id=job.id, idempotency_key="k4")).created
        # Other guilds and DMs are not affected.
        await s.imagine(ALICE, Place("discord", "guild2", "chan1"), "a fox", idempotency_key="k5")
        await s.imagine(ALICE, Place("discord"), "a fox", idempotency_key="k6")
        # Nothing charged for the refusals.
        assert (await s.quota(ALICE, GUILD)).used_today == 4
        assert (await s.allow_channels(ADMIN, GUILD, [])).allowed_channels == ()
        assert (await s.imagine(ALICE, GUILD, "a fox", idempotency_key="k7")).created
        rules = await s.place_rules(GUILD)
        assert rules.allowed and rules.allowed_channels == () and not rules.private
        async with core.db.read() as db:  # rows that set nothing are removed
            assert (await db.execute(select(func.count()).select_from(ChannelSettings))).scalar_one() == 0


async def test_role_limits_highest_wins_user_override_wins_and_only_in_their_guild(db_url, tmp_path):
    async with running_core(db_url, tmp_path, start=False, quotas={"daily_limit": 2}) as (core, _):
        s = core.service
        await s.set_guild_limit(ADMIN, "guild1", 3)
        await s.set_role_limit(ADMIN, GUILD, "artists", 5)
        listing = await s.set_role_limit(ADMIN, GUILD, "patrons", 8)
        assert listing.role_limits == {"artists": 5, "patrons": 8}
        both = dataclasses.replace(ALICE, role_ids=("artists", "patrons", "unknown"))
        q = await s.quota(both, GUILD)
        assert (q.daily_limit, q.limit_source) == (8, "role")
        q = await s.quota(dataclasses.replace(ALICE, role_ids=("artists",)), GUILD)
        assert (q.daily_limit, q.limit_source) == (5, "role")
        q = await s.quota(dataclasses.replace(ALICE, role_ids=("nobody",)), GUILD)
        assert (q.daily_limit, q.limit_source) == (3, "guild")
        # A role of guild1 means nothing in guild2 (the same role id there is another role).
        q = await s.quota(both, Place("discord", "guild2", "c"))
        assert (q.daily_limit, q.limit_source) == (2, "global")
        # A per-user limit wins over the roles, lower or higher.
        await s.set_user_limit(ADMIN, "alice", 1)
        q = await s.quota(both, GUILD)
        assert (q.daily_limit, q.limit_source) == (1, "user")
        await s.set_user_limit(ADMIN, "alice", None)
        # Removing a role limit.
        assert (await s.set_role_limit(ADMIN, GUILD, "patrons", None)).role_limits == {"artists": 5}
        assert (await s.quota(both, GUILD)).daily_limit == 5
        with pytest.raises(BadParameters, match="daily limit must be a whole number"):
            await s.set_role_limit(ADMIN, GUILD, "artists", -1)
        with pytest.raises(BadParameters, match="belong to a server"):
            await s.set_role_limit(ADMIN, Place("discord"), "artists", 4)
        with pytest.raises(NotAdmin):
            await s.set_role_limit(BOB, GUILD, "artists", 100)


async def test_role_limit_is_exact_under_concurrent_submissions(db_url, tmp_path):
    """40 simultaneous submissions from one user whose best role allows 7: exactly 7 accepted."""
    async with running_core(db_url, tmp_path, start=False, quotas={"daily_limit": 1}) as (core, _):
        s = core.service
        await s.set_role_limit(ADMIN, GUILD, "low", 3)
        await s.set_role_limit(ADMIN, GUILD, "high", 7)
        alice = dataclasses.replace(ALICE, role_ids=("low", "high"))
        results = await asyncio.gather(
            *[s.imagine(alice, GUILD, f"fox {i}", idempotency_key=f"race-{i}") for i in range(40)],
            return_exceptions=True,
        )
        accepted = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, BaseException)]
        assert len(accepted) == 7
        assert all(isinstance(r, QuotaExceeded) for r in refused), refused[:1]
        async with core.db.read() as db:
            assert (await db.execute(select(func.count()).select_from(Job))).scalar_one() == 7
            assert (await db.execute(select(QuotaUsage.images_used))).scalar_one() == 7


async def test_channel_defaults_apply_under_the_flags(db_url, tmp_path):
    async with running_core(db_url, tmp_path, start=False) as (core, _):
        s = core.service
        s.catalog = ModelCatalog([SD15, SDXL])
        listing = await s.set_channel_defaults(
            ADMIN, ART, "art", ChannelDefaults(model="SDXL-base", aspect_ratio="3:2", steps=45)
        )
        assert listing.defaults == {"art": ChannelDefaults("sdxl-base", "3:2", 45)}
        assert (await s.place_rules(ART)).defaults == ChannelDefaults("sdxl-base", "3:2", 45)
        job = await s.imagine(ALICE, ART, "a fox", idempotency_key="a")
        p = job.params
        assert (p.model, p.aspect_ratio, p.steps, p.width > p.height) == ("sdxl-base", "3:2", 45, True)
        # Flags and options win over every default.
        job = await s.imagine(
            ALICE, ART, "a fox --ar 1:1 --steps 10", {"model": "sd15-base"}, idempotency_key="b"
        )
        p = job.params
        assert (p.model, p.aspect_ratio, p.steps, p.width == p.height) == ("sd15-base", "1:1", 10, True)
        # Another channel has none of them.
        job = await s.imagine(ALICE, GUILD, "a fox", idempotency_key="c")
        assert (job.params.model, job.params.aspect_ratio) == (None, None)
        # Bad defaults are refused naming the flag, as a prompt's would be.
        with pytest.raises(BadParameters) as e:
            await s.set_channel_defaults(ADMIN, ART, "art", ChannelDefaults(steps=51, model="sdxl-base"))
        assert e.value.field == "steps"
        with pytest.raises(BadParameters) as e:
            await s.set_channel_defaults(ADMIN, ART, "art", ChannelDefaults(aspect_ratio="9:0"))
        assert e.value.field == "ar"
        with pytest.raises(BadParameters, match="There is no model 'nope'"):
            await s.set_channel_defaults(ADMIN, ART, "art", ChannelDefaults(model="nope"))
        # A default model the guild no longer allows is skipped, not a refusal of every job.
        await s.allow_models(ADMIN, ART, ["sd15-base"])
        job = await s.imagine(ALICE, ART, "a fox", idempotency_key="d")
        assert job.params.model is None and job.params.steps == 45  # None: the servers' default, sd15-base
        # All None removes them.
        assert (await s.set_channel_defaults(ADMIN, ART, "art", ChannelDefaults())).defaults == {}


async def test_private_mode_channel_wins_over_guild_and_marks_jobs(db_url, tmp_path):
    async with running_core(db_url, tmp_path) as (core, delivery):
        s = core.service
        assert not (await s.place_rules(GUILD)).private
        listing = await s.set_private(ADMIN, GUILD, None, True)
        assert listing.private_guild
        await s.set_private(ADMIN, GUILD, "art", False)
        assert (await s.place_rules(GUILD)).private
        assert not (await s.place_rules(ART)).private
        job = await s.imagine(ALICE, GUILD, "a fox", idempotency_key="p1")
        public = await s.imagine(ALICE, ART, "a fox", idempotency_key="p2")
        assert job.private and not public.private
        await delivery.wait_for(lambda: job.id in delivery.succeeded and public.id in delivery.succeeded)
        assert delivery.succeeded[job.id][0][0].private
        assert not delivery.succeeded[public.id][0][0].private
        # A follow-up in a private channel is private too.
        again = await s.reroll(ALICE, GUILD, job_id=public.id, idempotency_key="p3")
        assert again.private
        # Reactions start no job in private mode (public, with no interaction to answer privately).
        await s.attach_result_message(public.id, "msg-1")
        assert await s.react(BOB, GUILD, "msg-1", "🔁", idempotency_key="p4") is None
        assert (await s.react(BOB, ART, "msg-1", "🔁", idempotency_key="p5")) is not None
        listing = await s.set_private(ADMIN, GUILD, "art", None)  # back to the guild's
        assert listing.private_channels == {} and (await s.place_rules(ART)).private
        listing = await s.set_private(ADMIN, GUILD, None, False)
        assert not listing.private_guild and not (await s.place_rules(ART)).private


async def test_every_change_is_audited_and_refusals_too(db_url, tmp_path):
    async with running_core(db_url, tmp_path, start=False) as (core, _):
        s = core.service
        await s.allow_channels(ADMIN, GUILD, ["art"])
        await s.set_channel_defaults(ADMIN, GUILD, "art", ChannelDefaults(steps=12))
        await s.set_private(ADMIN, GUILD, "art", True)
        await s.set_role_limit(ADMIN, GUILD, "artists", 9)
        for call in (
            s.allow_channels(BOB, GUILD, []),
            s.set_private(BOB, GUILD, None, False),
            s.place_settings(BOB, GUILD),
        ):
            with pytest.raises(NotAdmin):
                await call
        entries = [(e.action, e.target, e.actor_user_id) for e in await s.audit_log(ADMIN, 20)]
        assert entries[:3] == [
            ("refused:place_settings", "guild:guild1", "bob"),
            ("refused:set_private", "guild:guild1", "bob"),
            ("refused:allow_channels", "guild:guild1", "bob"),
        ]
        assert entries[3:] == [
            ("set_role_limit", "role:artists", "root"),
            ("set_private", "channel:art", "root"),
            ("set_channel_defaults", "channel:art", "root"),
            ("allow_channels", "guild:guild1", "root"),
        ]
        details = {e.action: e.details for e in await s.audit_log(ADMIN, 20)}
        assert details["set_role_limit"] == {"guild_id": "guild1", "daily_limit": 9}
        assert details["set_channel_defaults"]["steps"] == 12
        assert details["allow_channels"] == {"channels": ["art"]}
        listing = await s.place_settings(ADMIN, GUILD)
        assert (listing.allowed_channels, listing.private_channels, listing.role_limits) == (
            ("art",),
            {"art": True},
            {"artists": 9},
        )


async def test_role_ids_are_checked_like_other_ids(sqlite_url, tmp_path):
    async with running_core(sqlite_url, tmp_path, start=False) as (core, _):
        with pytest.raises(BadParameters) as e:
            await core.service.imagine(
                Actor("discord", "alice", role_ids=("ok", "x" * 65)), GUILD, "a fox", idempotency_key="r"
            )
        assert e.value.field == "role"
