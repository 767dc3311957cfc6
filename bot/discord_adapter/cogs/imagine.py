"""/imagine: text to image, or from an attached image (image-to-image at `strength`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord_adapter.attachments import read_image
from bot.discord_adapter.cogs.models import complete_loras, complete_models

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
        model="The model to draw with (/models lists them)",
        lora="A LoRA to apply, NAME or NAME:WEIGHT (-2 to 2); more with --lora in the prompt",
        negative="What to keep out of the image",
        count="How many images (1-4)",
        seed="Seed for reproducible results",
        steps="Denoising steps (more is slower and finer)",
        aspect="Aspect ratio",
        guidance="How closely to follow the prompt (0-30)",
        image="An image to start from (PNG, JPEG or WebP); the size follows it",
        strength="With an image: how far the result may stray from it (0-1, default 0.6)",
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
        image: discord.Attachment | None = None,
        strength: app_commands.Range[float, 0.01, 1.0] | None = None,
        model: app_commands.Range[str, 1, 200] | None = None,
        lora: app_commands.Range[str, 1, 200] | None = None,
    ) -> None:
        await self.bot.defer_job(interaction)
        options = {
            "negative": negative,
            "n": count,
            "seed": seed,
            "steps": steps,
            "ar": aspect,
            "guidance": guidance,
            "strength": strength,
            "model": model,
            "lora": lora,
        }
        given = {k: v for k, v in options.items() if v is not None}
        common: dict[str, Any] = {
            "idempotency_key": self.bot.key(interaction),
            "delivery": self.bot.interaction_delivery(interaction),
        }
        actor, place = self.bot.actor(interaction), self.bot.place(interaction)
        if image is not None:
            data = await read_image("image", image, self.bot.config.max_attachment_bytes)
            job = await self.bot.service.image_to_image(actor, place, prompt, data, given, **common)
        else:
            job = await self.bot.service.imagine(actor, place, prompt, given, **common)
        # Show the queue position at once; the core reports later positions, progress and the
        # result through the delivery (which skips this if their news was shown first).
        log.info(
            "/imagine by %s in guild %s -> job %s (%s)",
            interaction.user.id,
            interaction.guild_id,
            job.id,
            "new" if job.created else "existing",
        )
        await self.bot.show_queued(job)

    @imagine.autocomplete("model")
    async def _model(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return await complete_models(self.bot, interaction, current)

    @imagine.autocomplete("lora")
    async def _lora(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return await complete_loras(self.bot, interaction, current)


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(Imagine(bot))
