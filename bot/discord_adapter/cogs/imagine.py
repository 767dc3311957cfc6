"""/imagine: text to image."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord_adapter.errors import defer

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from bot.discord_adapter.bot import ImagineBot

ASPECTS = ["1:1", "3:2", "2:3", "4:3", "3:4", "16:9", "9:16"]


class Imagine(commands.Cog):
    def __init__(self, bot: ImagineBot):
        self.bot = bot

    @app_commands.command(name="imagine", description="Generate images from a text prompt.")
    @app_commands.describe(
        prompt="What to draw. Flags work here too: --seed 42 --n 4 --ar 3:2 --steps 30 --guidance 7 --no blurry",
        negative="What to keep out of the image",
        count="How many images (1-4)",
        seed="Seed for reproducible results",
        steps="Denoising steps (more is slower and finer)",
        aspect="Aspect ratio",
        guidance="How closely to follow the prompt (0-30)",
    )
    @app_commands.choices(aspect=[app_commands.Choice(name=a, value=a) for a in ASPECTS])
    @app_commands.guild_only()
    async def imagine(
        self,
        interaction: discord.Interaction,
        prompt: app_commands.Range[str, 1, 1000],
        negative: str | None = None,
        count: app_commands.Range[int, 1, 4] | None = None,
        seed: app_commands.Range[int, 0, 2**32 - 1] | None = None,
        steps: app_commands.Range[int, 1, 150] | None = None,
        aspect: str | None = None,
        guidance: app_commands.Range[float, 0.0, 30.0] | None = None,
    ) -> None:
        await defer(interaction, ephemeral=False)
        options = {
            "negative": negative,
            "n": count,
            "seed": seed,
            "steps": steps,
            "ar": aspect,
            "guidance": guidance,
        }
        job = await self.bot.service.imagine(
            self.bot.actor(interaction),
            self.bot.place(interaction),
            prompt,
            {k: v for k, v in options.items() if v is not None},
            idempotency_key=self.bot.key(interaction),
            delivery=self.bot.interaction_delivery(interaction),
        )
        # Show the queue position at once; the core reports later positions, progress and the
        # result through the delivery (which ignores this if the job already started).
        log.info(
            "/imagine by %s in guild %s -> job %s (%s, position %s)",
            interaction.user.id,
            interaction.guild_id,
            job.id,
            "new" if job.created else "existing",
            job.position,
        )
        if job.created and job.state == "queued":
            await self.bot.delivery.on_queued(job, job.position)


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(Imagine(bot))
