"""/inpaint: repaint part of an uploaded image."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord_adapter.attachments import read_image

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from bot.discord_adapter.bot import ImagineBot


class Inpaint(commands.Cog):
    def __init__(self, bot: ImagineBot):
        self.bot = bot

    @app_commands.command(
        name="inpaint", description="Repaint part of an image (white in the mask, or its transparent pixels)."
    )
    @app_commands.describe(
        image="The image to change (PNG, JPEG or WebP)",
        prompt="What to paint in the masked area",
        mask="White = repaint, black = keep; same size as the image. Optional if the image has transparency",
        seed="Seed for reproducible results",
    )
    @app_commands.guild_only()
    async def inpaint(
        self,
        interaction: discord.Interaction,
        image: discord.Attachment,
        prompt: app_commands.Range[str, 1, 1000],
        mask: discord.Attachment | None = None,
        seed: app_commands.Range[int, 0, 2**32 - 1] | None = None,
    ) -> None:
        await self.bot.defer_job(interaction)
        limit = self.bot.config.max_attachment_bytes
        image_bytes = await read_image("image", image, limit)
        mask_bytes = await read_image("mask", mask, limit) if mask is not None else None
        job = await self.bot.service.inpaint(
            self.bot.actor(interaction),
            self.bot.place(interaction),
            prompt,
            image_bytes,
            mask_bytes,
            {"seed": seed} if seed is not None else None,
            idempotency_key=self.bot.key(interaction),
            delivery=self.bot.interaction_delivery(interaction),
        )
        # Show the queue position at once; the core reports later positions, progress and the
        # result through the delivery (which skips this if their news was shown first).
        log.info(
            "/inpaint by %s in guild %s -> job %s (%s)",
            interaction.user.id,
            interaction.guild_id,
            job.id,
            "new" if job.created else "existing",
        )
        await self.bot.show_queued(job)


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(Inpaint(bot))
