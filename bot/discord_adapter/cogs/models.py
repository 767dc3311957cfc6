"""/models, and the autocomplete of model and LoRA options: what the core says is available here."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.core.api import CoreError, ModelEntry, ModelListing
from bot.discord_adapter import messages
from bot.discord_adapter.errors import defer

if TYPE_CHECKING:
    from bot.discord_adapter.bot import ImagineBot

log = logging.getLogger(__name__)

# Discord shows at most 25 suggestions, each name and value at most 100 characters.
MAX_CHOICES = 25
MAX_CHOICE_CHARS = 100


async def _listing(bot: ImagineBot, interaction: discord.Interaction) -> ModelListing | None:
    try:
        return await bot.service.models(bot.place(interaction))
    except CoreError as e:  # an autocomplete can't show an error: no suggestions, logged
        log.info("no model suggestions for %s: %s", interaction.user.id, e.message)
        return None


async def complete_models(
    bot: ImagineBot, interaction: discord.Interaction, current: str
) -> list[app_commands.Choice[str]]:
    """The models allowed here whose name contains what was typed, the default first."""
    listing = await _listing(bot, interaction)
    typed = current.strip().casefold()
    found = [m for m in (listing.models if listing else ()) if typed in m.name.casefold()]
    return [
        app_commands.Choice(name=_label(m)[:MAX_CHOICE_CHARS], value=m.name[:MAX_CHOICE_CHARS])
        for m in found[:MAX_CHOICES]
    ]


async def complete_loras(
    bot: ImagineBot, interaction: discord.Interaction, current: str
) -> list[app_commands.Choice[str]]:
    """The LoRAs of the model chosen in the `model` option (the default's when none), allowed here,
    matching what was typed before any ":weight" (which the suggestion keeps)."""
    listing = await _listing(bot, interaction)
    if listing is None or not listing.models:
        return []
    chosen = str(getattr(interaction.namespace, "model", "") or "").casefold()
    model = next((m for m in listing.models if m.name.casefold() == chosen), listing.default)
    if model is None:
        return []
    name, colon, weight = current.strip().partition(":")
    typed = name.casefold()
    return [
        app_commands.Choice(
            name=f"{lora}{colon}{weight}"[:MAX_CHOICE_CHARS],
            value=f"{lora}{colon}{weight}"[:MAX_CHOICE_CHARS],
        )
        for lora in model.loras
        if typed in lora.casefold()
    ][:MAX_CHOICES]


def _label(model: ModelEntry) -> str:
    return f"{model.name} ({model.label}{', default' if model.default else ''})"


class Models(commands.Cog):
    def __init__(self, bot: ImagineBot):
        self.bot = bot

    @app_commands.command(name="models", description="The models and LoRAs you can use here.")
    async def models(self, interaction: discord.Interaction) -> None:
        await defer(interaction, ephemeral=True)
        listing = await self.bot.service.models(self.bot.place(interaction))
        await interaction.followup.send(messages.models(listing), ephemeral=True)


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(Models(bot))
