"""Channel and role settings end to end over the fake Discord: /admin commands (Manage Server only),
role limits from the interaction's member roles, allowed channels, and private (ephemeral) results."""

from __future__ import annotations

from bot.core.api import Actor, Place
from tests.discord.fake_discord import FakeDiscord
from tests.discord.harness import App, app_config, wait_ephemeral, wait_result


async def test_settings_commands_need_manage_server(fake_discord: FakeDiscord, tmp_path):
    member = fake_discord.user("member")
    async with App(fake_discord, app_config(tmp_path, fake_discord)) as app:
        texts = []
        for sub, options in (
            ("settings", {}),
            ("allow-channels", {"channels": "<#123>"}),
            ("private", {"mode": "on"}),
        ):
            rec = await fake_discord.slash("admin", member, options, subcommand=[sub])
            texts.append(await wait_ephemeral(fake_discord, rec))
        rules = await app.service.place_rules(
            Place("discord", str(fake_discord.guild_id), str(fake_discord.channel_id))
        )
    assert all("Only admins" in t for t in texts), texts
    assert rules.allowed and not rules.private  # nothing changed


async def test_role_limit_applies_to_members_with_the_role(fake_discord: FakeDiscord, tmp_path):
    admin = fake_discord.user("boss", admin=True)
    artist = fake_discord.user("artist", roles=[fake_discord.admin_role_id])
    plain = fake_discord.user("plain")
    config = app_config(tmp_path, fake_discord, quotas={"daily_limit": 1})
    async with App(fake_discord, config) as app:
        rec = await fake_discord.slash(
            "admin", admin, {"role": fake_discord.admin_role_id, "limit": 2},
            subcommand=["role-limit"], command_options={"role": 8},
        )  # fmt: skip
        set_text = await wait_ephemeral(fake_discord, rec)
        for i in range(2):
            await wait_result(fake_discord, await fake_discord.slash("imagine", artist, {"prompt": f"a {i}"}))
        over = await wait_ephemeral(
            fake_discord, await fake_discord.slash("imagine", artist, {"prompt": "c"})
        )
        await wait_result(fake_discord, await fake_discord.slash("imagine", plain, {"prompt": "d"}))
        plain_over = await wait_ephemeral(
            fake_discord, await fake_discord.slash("imagine", plain, {"prompt": "e"})
        )
        quota = await wait_ephemeral(fake_discord, await fake_discord.slash("quota", artist))
        audit = await app.service.audit_log(Actor("discord", str(admin.id), is_admin=True), 5)
    assert f"<@&{fake_discord.admin_role_id}> now has 2 images per day" in set_text
    assert f"<@&{fake_discord.admin_role_id}> 2/day" in set_text
    assert "Daily limit reached" in over and "Daily limit reached" in plain_over
    assert "**2** of **2** images today (your roles' highest limit)" in quota, quota
    assert audit[0].action == "set_role_limit" and audit[0].target == f"role:{fake_discord.admin_role_id}"


async def test_allowed_channels_refuse_elsewhere_privately(fake_discord: FakeDiscord, tmp_path):
    admin, user = fake_discord.user("boss", admin=True), fake_discord.user("user")
    async with App(fake_discord, app_config(tmp_path, fake_discord)) as app:
        rec = await fake_discord.slash(
            "admin", admin, {"channels": "<#4242> 4343"}, subcommand=["allow-channels"]
        )
        set_text = await wait_ephemeral(fake_discord, rec)
        refused = await fake_discord.slash("imagine", user, {"prompt": "a fox"})
        refusal = await wait_ephemeral(fake_discord, refused)
        listing = await wait_ephemeral(
            fake_discord, await fake_discord.slash("admin", admin, {}, subcommand=["settings"])
        )
        back = await fake_discord.slash("admin", admin, {}, subcommand=["allow-channels"])
        await wait_ephemeral(fake_discord, back)
        await wait_result(fake_discord, await fake_discord.slash("imagine", user, {"prompt": "a fox"}))
        jobs = await app.service.history(Actor("discord", str(user.id)))
    assert "Image commands allowed in**: <#4242>, <#4343>" in set_text
    assert refusal == "⛔ Image commands are not allowed in this channel. Use them in <#4242>, <#4343>."
    assert refused.ephemeral  # answered privately, at once, without a public "thinking..."
    assert "<#4242>, <#4343>" in listing
    assert len(jobs) == 1  # the refused command made no job


async def test_private_mode_results_are_ephemeral_and_never_in_the_channel(
    fake_discord: FakeDiscord, tmp_path
):
    admin, user = fake_discord.user("boss", admin=True), fake_discord.user("user")
    async with App(fake_discord, app_config(tmp_path, fake_discord)) as app:
        rec = await fake_discord.slash("admin", admin, {"mode": "on"}, subcommand=["private"])
        set_text = await wait_ephemeral(fake_discord, rec)
        help_text = await wait_ephemeral(fake_discord, await fake_discord.slash("help", user))
        job_rec = await fake_discord.slash("imagine", user, {"prompt": "a secret fox", "count": 2})
        result = await wait_result(fake_discord, job_rec)
        # Its buttons still work: a re-roll from the private result is private too.
        reroll_id = next(c for row in fake_discord.button_ids(result) for c in row if ":reroll:" in c)
        click = await fake_discord.click(result, reroll_id, user)
        rerolled = await wait_result(fake_discord, click)
        channel = fake_discord.channel_messages()
        audit = await app.service.audit_log(Actor("discord", str(admin.id), is_admin=True), 5)
    assert f"Private mode of <#{fake_discord.channel_id}>: on" in set_text
    assert "Private mode" in help_text
    assert job_rec.ephemeral and result["flags"] & 64 and result["attachments"]
    assert click.ephemeral and rerolled["flags"] & 64
    assert channel == []  # nothing was posted in the channel
    assert audit[0].action == "set_private" and audit[0].details["private"] is True
