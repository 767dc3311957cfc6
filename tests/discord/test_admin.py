"""/admin: allowed for Manage Server or a configured role, refused for everybody else."""

from __future__ import annotations

from bot.core.api import Actor, Place
from tests.discord.fake_discord import FakeDiscord
from tests.discord.harness import App, app_config, wait_ephemeral, wait_result


async def test_admin_commands_refused_for_members(fake_discord: FakeDiscord, tmp_path):
    member, victim = fake_discord.user("member"), fake_discord.user("victim")
    async with App(fake_discord, app_config(tmp_path, fake_discord)) as app:
        texts = []
        for sub, options in (
            ("stats", {}),
            ("ban", {"user": victim}),
            ("credits", {"user": member, "amount": 50}),
        ):
            rec = await fake_discord.slash("admin", member, options, subcommand=[sub])
            texts.append(await wait_ephemeral(fake_discord, rec))
            assert rec.ephemeral
        victim_quota = await app.service.quota(Actor("discord", str(victim.id)), _place(fake_discord))
        member_quota = await app.service.quota(Actor("discord", str(member.id)), _place(fake_discord))
    assert all("Only admins" in t for t in texts), texts
    assert not victim_quota.banned and member_quota.bonus_credits == 0  # nothing happened


async def test_admin_commands_allowed_for_manage_server(fake_discord: FakeDiscord, tmp_path):
    admin, user = fake_discord.user("boss", admin=True), fake_discord.user("user")
    async with App(fake_discord, app_config(tmp_path, fake_discord, quotas={"daily_limit": 5})) as app:

        async def admin_cmd(sub, **options):
            rec = await fake_discord.slash("admin", admin, options, subcommand=[sub])
            return await wait_ephemeral(fake_discord, rec)

        limit_text = await admin_cmd("user-limit", user=user, limit=1)
        first = await fake_discord.slash("imagine", user, {"prompt": "one"})
        await wait_result(fake_discord, first)
        over = await wait_ephemeral(
            fake_discord, await fake_discord.slash("imagine", user, {"prompt": "two"})
        )
        credits_text = await admin_cmd("credits", user=user, amount=3)
        q_after_credits = await app.service.quota(Actor("discord", str(user.id)), _place(fake_discord))
        reset_text = await admin_cmd("reset", user=user)
        q_after_reset = await app.service.quota(Actor("discord", str(user.id)), _place(fake_discord))
        usage_text = await admin_cmd("usage", user=user)
        ban_text = await admin_cmd("ban", user=user, reason="spam")
        banned = await wait_ephemeral(
            fake_discord, await fake_discord.slash("imagine", user, {"prompt": "three"})
        )
        unban_text = await admin_cmd("unban", user=user)
        again = await fake_discord.slash("imagine", user, {"prompt": "four"})
        await wait_result(fake_discord, again)
        server_text = await admin_cmd("server-limit", limit=7)
        stranger_quota = await app.service.quota(Actor("discord", "12345"), _place(fake_discord))
        stats_text = await admin_cmd("stats")
        audit = await app.service.audit_log(Actor("discord", str(admin.id), is_admin=True), 20)
    assert "1 images per day" in limit_text
    assert "Daily limit reached" in over
    assert "Granted 3" in credits_text and q_after_credits.bonus_credits == 3
    assert "reset" in reset_text and q_after_reset.used_today == 0
    assert f"<@{user.id}>" in usage_text and "**1**" in usage_text
    assert "banned" in ban_text and "banned" in banned.lower() and "spam" in banned
    assert "may generate images again" in unban_text
    assert "7 images per user per day" in server_text and stranger_quota.daily_limit == 7
    assert "Images today" in stats_text and "queue depth" in stats_text
    actions = {e.action for e in audit}
    assert {"set_user_limit", "grant_credits", "reset_usage", "ban", "unban"} <= actions, actions


async def test_admin_role_from_config(fake_discord: FakeDiscord, tmp_path):
    moderator = fake_discord.user("mod", roles=[fake_discord.admin_role_id])
    target = fake_discord.user("target")
    config = app_config(tmp_path, fake_discord, discord={"admin_roles": ["imagine admin"]})
    async with App(fake_discord, config) as app:
        rec = await fake_discord.slash(
            "admin", moderator, {"user": target, "amount": 2}, subcommand=["credits"]
        )
        text = await wait_ephemeral(fake_discord, rec)
        q = await app.service.quota(Actor("discord", str(target.id)), _place(fake_discord))
    assert "Granted 2" in text and q.bonus_credits == 2


def _place(fake: FakeDiscord) -> Place:
    return Place("discord", str(fake.guild_id), str(fake.channel_id))
