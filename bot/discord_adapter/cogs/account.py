"""/history, /quota and /help: what a user needs to know about their own use."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.core.api import CoreError
from bot.discord_adapter import messages
from bot.discord_adapter.errors import defer

if TYPE_CHECKING:
    from bot.discord_adapter.bot import ImagineBot


class Account(commands.Cog):
    def __init__(self, bot: ImagineBot):
        self.bot = bot

    @app_commands.command(name="history", description="Your latest results, with links.")
    async def history(self, interaction: discord.Interaction) -> None:
        await defer(interaction, ephemeral=True)
        jobs = await self.bot.service.history(self.bot.actor(interaction), self.bot.config.history_limit)
        await interaction.followup.send(messages.history(jobs), ephemeral=True)

    @app_commands.command(name="quota", description="Your usage today and when it resets.")
    async def quota(self, interaction: discord.Interaction) -> None:
        await defer(interaction, ephemeral=True)
        q = await self.bot.service.quota(self.bot.actor(interaction), self.bot.place(interaction))
        await interaction.followup.send(messages.quota(q), ephemeral=True)

    @app_commands.command(name="help", description="How to use the image bot.")
    async def help(self, interaction: discord.Interaction) -> None:
        await defer(interaction, ephemeral=True)
        place = self.bot.place(interaction)
        try:
            listing = await self.bot.service.models(place)
            rules = await self.bot.service.place_rules(place)
        except CoreError:  # the database is away: help without the models still helps
            listing, rules = None, None
        await interaction.followup.send(messages.help_text(listing, rules), ephemeral=True)


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(Account(bot))
