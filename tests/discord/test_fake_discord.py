"""The fake itself: the library internals it relies on, and a plain bot logging in and syncing."""

from __future__ import annotations

import discord
import yarl
from discord.ext import commands

from tests.discord.fake_discord import FakeDiscord
from tests.discord.harness import running


def test_library_internals_canary():
    """The fake points these discord.py internals at itself; an upgrade that moves them breaks here first."""
    assert discord.__version__.startswith("2.7"), discord.__version__
    assert discord.http.Route.BASE == "https://discord.com/api/v10"
    route = discord.http.Route("GET", "/users/@me")
    assert route.url == discord.http.Route.BASE + "/users/@me"  # BASE is read each time a route is built
    assert isinstance(discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY, yarl.URL)
    # Webhooks (interaction followups) build their URLs from the same Route class.
    from discord.webhook import async_ as webhook_async

    assert webhook_async.Route is discord.http.Route
    # Interactions read the upload limit from this payload field (KeyError without it).
    import inspect

    assert "attachment_size_limit" in inspect.getsource(discord.Interaction._from_data)


async def test_plain_bot_logs_in_and_syncs(fake_discord: FakeDiscord):
    bot = commands.Bot(
        command_prefix=commands.when_mentioned, intents=discord.Intents(guilds=True), guild_ready_timeout=0.05
    )

    @bot.tree.command(name="ping", description="Answer pong.")
    async def ping(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("pong")

    async with running(bot, fake_discord):
        assert bot.user is not None and bot.user.id == fake_discord.bot_user.id
        assert bot.get_guild(fake_discord.guild_id) is not None
        guild = discord.Object(fake_discord.guild_id)
        bot.tree.copy_global_to(guild=guild)
        synced = await bot.tree.sync(guild=guild)
        assert [c.name for c in synced] == ["ping"]
        assert fake_discord.command_syncs[-1]["guild_id"] == fake_discord.guild_id
        user = fake_discord.user("alice")
        rec = await fake_discord.slash("ping", user)
        await fake_discord.wait_for(lambda: rec.callbacks, what="ping callback")
        assert rec.callbacks[0]["status"] == 200
        assert rec.callbacks[0]["body"]["data"]["content"] == "pong"
        await fake_discord.wait_for(lambda: fake_discord.heartbeats, what="a heartbeat")
        assert fake_discord.identifies[0]["token"] == fake_discord.token
