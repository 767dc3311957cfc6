"""/admin: limits, credits, usage reset, bans, stats, the server's default model and allowed models
and LoRAs, and channel and role settings (allowed channels, channel defaults, private mode, role
limits, the settings listing), for Manage Server or a configured role.

The adapter decides who is an admin (`Actor.is_admin`); the core enforces it and audits every call.
The check below only saves a round trip and gives the same refusal earlier.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.core.api import BadParameters, ChannelDefaults, NotAdmin
from bot.discord_adapter import messages
from bot.discord_adapter.cogs.imagine import ASPECTS
from bot.discord_adapter.cogs.models import complete_models
from bot.discord_adapter.errors import defer

if TYPE_CHECKING:
    from bot.discord_adapter.bot import ImagineBot

# A channel as an admin types it into a text option: a mention (<#123>) or a bare id.
CHANNEL_RE = re.compile(r"<#(\d+)>|(\d+)")

# Largest daily limit an admin can set: far above any real use, low enough to catch a typo.
MAX_DAILY_LIMIT = 100_000


@app_commands.guild_only()
@app_commands.default_permissions(manage_guild=True)
class Admin(commands.GroupCog, group_name="admin", group_description="Image bot administration."):
    def __init__(self, bot: ImagineBot):
        self.bot = bot
        super().__init__()

    async def _start(self, interaction: discord.Interaction, operation: str):
        await defer(interaction, ephemeral=True)
        actor = self.bot.actor(interaction)
        if not actor.is_admin:
            raise NotAdmin(f"/admin {operation}")
        return actor

    async def _done(self, interaction: discord.Interaction, text: str) -> None:
        await interaction.followup.send(text, ephemeral=True, allowed_mentions=discord.AllowedMentions.none())

    @app_commands.command(
        name="user-limit", description="Set a user's daily image limit (leave empty to remove it)."
    )
    async def user_limit(
        self,
        interaction: discord.Interaction,
        user: discord.User,
        limit: app_commands.Range[int, 0, MAX_DAILY_LIMIT] | None = None,
    ) -> None:
        actor = await self._start(interaction, "user-limit")
        q = await self.bot.service.set_user_limit(actor, str(user.id), limit)
        what = f"{limit} images per day" if limit is not None else "the default limit"
        await self._done(interaction, f"✅ {user.mention} now has {what} ({q.remaining} left today).")

    @app_commands.command(
        name="server-limit", description="Set this server's default daily limit (empty to remove)."
    )
    async def server_limit(
        self,
        interaction: discord.Interaction,
        limit: app_commands.Range[int, 0, MAX_DAILY_LIMIT] | None = None,
    ) -> None:
        actor = await self._start(interaction, "server-limit")
        await self.bot.service.set_guild_limit(actor, str(interaction.guild_id), limit)
        what = f"{limit} images per user per day" if limit is not None else "the global default"
        await self._done(interaction, f"✅ This server's limit is now {what}.")

    @app_commands.command(name="credits", description="Grant a user bonus images beyond the daily limit.")
    async def credits(
        self, interaction: discord.Interaction, user: discord.User, amount: app_commands.Range[int, 1, 10_000]
    ) -> None:
        actor = await self._start(interaction, "credits")
        q = await self.bot.service.grant_credits(actor, str(user.id), amount)
        await self._done(
            interaction, f"✅ Granted {amount} credits to {user.mention} ({q.bonus_credits} in total)."
        )

    @app_commands.command(name="reset", description="Reset a user's usage for today.")
    async def reset(self, interaction: discord.Interaction, user: discord.User) -> None:
        actor = await self._start(interaction, "reset")
        q = await self.bot.service.reset_usage(actor, str(user.id))
        await self._done(interaction, f"✅ Usage of {user.mention} reset ({q.remaining} left today).")

    @app_commands.command(name="usage", description="Show a user's usage and limits.")
    async def usage(self, interaction: discord.Interaction, user: discord.User) -> None:
        actor = await self._start(interaction, "usage")
        q = await self.bot.service.usage(actor, self.bot.place(interaction), str(user.id))
        await self._done(interaction, f"{user.mention}:\n" + messages.quota(q).replace("You have", "Has"))

    @app_commands.command(name="ban", description="Stop a user from generating images.")
    async def ban(self, interaction: discord.Interaction, user: discord.User, reason: str = "") -> None:
        actor = await self._start(interaction, "ban")
        await self.bot.service.ban(actor, str(user.id), reason)
        await self._done(interaction, f"✅ {user.mention} is banned from generating images.")

    @app_commands.command(name="unban", description="Allow a banned user to generate images again.")
    async def unban(self, interaction: discord.Interaction, user: discord.User) -> None:
        actor = await self._start(interaction, "unban")
        await self.bot.service.unban(actor, str(user.id))
        await self._done(interaction, f"✅ {user.mention} may generate images again.")

    @app_commands.command(name="stats", description="Jobs, images today, top users and queue depth.")
    async def stats(self, interaction: discord.Interaction) -> None:
        actor = await self._start(interaction, "stats")
        s = await self.bot.service.stats(actor, self.bot.place(interaction))
        await self._done(interaction, messages.stats(s))

    @app_commands.command(
        name="default-model",
        description="The model this server's jobs get when they name none (empty: the servers').",
    )
    async def default_model(
        self, interaction: discord.Interaction, model: app_commands.Range[str, 1, 200] | None = None
    ) -> None:
        actor = await self._start(interaction, "default-model")
        listing = await self.bot.service.set_default_model(actor, self.bot.place(interaction), model)
        what = f"**{model}**" if model else "the servers' default"
        await self._done(
            interaction, f"✅ This server's default model is now {what}.\n" + messages.models(listing)
        )

    @default_model.autocomplete("model")
    async def _default_model(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        return await complete_models(self.bot, interaction, current)

    @app_commands.command(
        name="allow-models", description="Only these models here, names separated by spaces (empty: all)."
    )
    async def allow_models(
        self, interaction: discord.Interaction, models: app_commands.Range[str, 1, 1000] | None = None
    ) -> None:
        actor = await self._start(interaction, "allow-models")
        listing = await self.bot.service.allow_models(actor, self.bot.place(interaction), models or [])
        await self._done(interaction, "✅ Allowed models updated.\n" + messages.models(listing))

    @app_commands.command(
        name="allow-loras", description="Only these LoRAs here, names separated by spaces (empty: all)."
    )
    async def allow_loras(
        self, interaction: discord.Interaction, loras: app_commands.Range[str, 1, 1000] | None = None
    ) -> None:
        actor = await self._start(interaction, "allow-loras")
        listing = await self.bot.service.allow_loras(actor, self.bot.place(interaction), loras or [])
        await self._done(interaction, "✅ Allowed LoRAs updated.\n" + messages.models(listing))

    # -- channel and role settings -------------------------------------------------------------

    @app_commands.command(
        name="allow-channels",
        description="Image commands only in these channels (mention them; empty: everywhere).",
    )
    async def allow_channels(
        self, interaction: discord.Interaction, channels: app_commands.Range[str, 1, 1000] | None = None
    ) -> None:
        actor = await self._start(interaction, "allow-channels")
        text = channels or ""
        ids = [a or b for a, b in CHANNEL_RE.findall(text)]
        if text.strip() and not ids:
            raise BadParameters("channels", "Mention the channels (#name), separated by spaces.", text)
        listing = await self.bot.service.allow_channels(actor, self.bot.place(interaction), ids)
        await self._done(interaction, "✅ Allowed channels updated.\n" + messages.settings(listing))

    @app_commands.command(
        name="channel-defaults",
        description="Defaults for a channel's jobs (model, aspect, steps); flags override them. Empty: none.",
    )
    @app_commands.choices(aspect=[app_commands.Choice(name=a, value=a) for a in ASPECTS])
    async def channel_defaults(
        self,
        interaction: discord.Interaction,
        channel: discord.TextChannel | None = None,
        model: app_commands.Range[str, 1, 200] | None = None,
        aspect: str | None = None,
        steps: app_commands.Range[int, 1, 150] | None = None,
    ) -> None:
        actor = await self._start(interaction, "channel-defaults")
        channel_id = str(channel.id if channel else interaction.channel_id)
        listing = await self.bot.service.set_channel_defaults(
            actor, self.bot.place(interaction), channel_id, ChannelDefaults(model, aspect, steps)
        )
        await self._done(
            interaction, f"✅ Defaults of <#{channel_id}> updated.\n" + messages.settings(listing)
        )

    @channel_defaults.autocomplete("model")
    async def _channel_model(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        return await complete_models(self.bot, interaction, current)

    @app_commands.command(
        name="private",
        description="Private mode: results only to whoever asked (a channel, or the whole server).",
    )
    async def private(
        self,
        interaction: discord.Interaction,
        mode: Literal["on", "off", "as the server"],
        channel: discord.TextChannel | None = None,
        whole_server: bool = False,
    ) -> None:
        actor = await self._start(interaction, "private")
        channel_id = None if whole_server else str(channel.id if channel else interaction.channel_id)
        value = {"on": True, "off": False}.get(mode)
        listing = await self.bot.service.set_private(actor, self.bot.place(interaction), channel_id, value)
        where = "this server" if channel_id is None else f"<#{channel_id}>"
        await self._done(interaction, f"✅ Private mode of {where}: {mode}.\n" + messages.settings(listing))

    @app_commands.command(
        name="role-limit",
        description="A role's daily image limit (empty removes it); members get their roles' highest.",
    )
    async def role_limit(
        self,
        interaction: discord.Interaction,
        role: discord.Role,
        limit: app_commands.Range[int, 0, MAX_DAILY_LIMIT] | None = None,
    ) -> None:
        actor = await self._start(interaction, "role-limit")
        listing = await self.bot.service.set_role_limit(
            actor, self.bot.place(interaction), str(role.id), limit
        )
        what = f"{limit} images per day" if limit is not None else "no limit of its own"
        await self._done(interaction, f"✅ {role.mention} now has {what}.\n" + messages.settings(listing))

    @app_commands.command(name="settings", description="This server's channel and role settings.")
    async def settings(self, interaction: discord.Interaction) -> None:
        actor = await self._start(interaction, "settings")
        listing = await self.bot.service.place_settings(actor, self.bot.place(interaction))
        await self._done(interaction, messages.settings(listing))


async def setup(bot: ImagineBot) -> None:
    cog = Admin(bot)
    if not bot.config.hide_admin_commands:
        cog.__cog_app_commands_group__.default_permissions = None  # type: ignore[union-attr]
    await bot.add_cog(cog)
