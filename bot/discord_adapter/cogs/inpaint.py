"""/inpaint: repaint part of an uploaded image."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord_adapter.errors import AttachmentError, defer

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from bot.discord_adapter.bot import ImagineBot

IMAGE_TYPES = {"image/png", "image/jpeg", "image/webp"}  # what the inference server decodes
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class Inpaint(commands.Cog):
    def __init__(self, bot: ImagineBot):
        self.bot = bot

    async def _read(self, field: str, attachment: discord.Attachment) -> bytes:
        """The attachment's bytes, or a clear refusal naming the option and the file."""
        ctype = (attachment.content_type or "").split(";")[0].strip().lower()
        if ctype not in IMAGE_TYPES and not (
            not ctype and attachment.filename.lower().endswith(IMAGE_SUFFIXES)
        ):
            raise AttachmentError(
                field,
                f"`{attachment.filename}` ({field}) is not a PNG, JPEG or WebP image.",
                attachment.filename,
            )
        limit = self.bot.config.max_attachment_bytes
        if attachment.size > limit:
            raise AttachmentError(
                field,
                f"`{attachment.filename}` ({field}) is {attachment.size / 2**20:.1f} MiB; "
                f"the limit is {limit / 2**20:.1f} MiB.",
                attachment.size,
            )
        try:
            data = await attachment.read()
        except discord.HTTPException as e:
            raise AttachmentError(field, f"Could not download `{attachment.filename}` ({field}).") from e
        if len(data) > limit:  # the declared size can lie
            raise AttachmentError(
                field, f"`{attachment.filename}` ({field}) is larger than {limit / 2**20:.1f} MiB.", len(data)
            )
        return data

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
        await defer(interaction, ephemeral=False)
        image_bytes = await self._read("image", image)
        mask_bytes = await self._read("mask", mask) if mask is not None else None
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
        # result through the delivery (which ignores this if the job already started).
        log.info(
            "/inpaint by %s in guild %s -> job %s (%s, position %s)",
            interaction.user.id,
            interaction.guild_id,
            job.id,
            "new" if job.created else "existing",
            job.position,
        )
        if job.created and job.state == "queued":
            await self.bot.delivery.on_queued(job, job.position)


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(Inpaint(bot))
