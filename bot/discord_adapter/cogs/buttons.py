"""Buttons on results and status messages, and the remix dialog.

A click on an operation (U1-U4, V1-V4, vary, re-roll, zoom out, pan) answers with a new public
"thinking" message, which becomes the new job's status and then its result, exactly like /imagine.
Cancel edits the status message it sits on. Remix opens a dialog prefilled with the parent's prompt
and flags; its submission starts the job. Everything resolves through the control's id and the
message it sits on (the core decides who may use whose result), so it works after a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import discord
from discord.ext import commands

from bot.core.api import BadParameters, JobView
from bot.core.controls import Pressed, press
from bot.core.operations import remix_text
from bot.discord_adapter import messages
from bot.discord_adapter.controls import REMIX_FORM, REMIX_IMAGE, REMIX_TEXT, RemixModal, modal_values
from bot.discord_adapter.errors import report

if TYPE_CHECKING:
    from bot.discord_adapter.bot import ImagineBot

log = logging.getLogger(__name__)

# The dialog must open within Discord's 3 s; reading the parent to prefill it gets this long.
PREFILL_WAIT_S = 1.5


class Buttons(commands.Cog):
    def __init__(self, bot: ImagineBot):
        self.bot = bot

    async def on_control(self, interaction: discord.Interaction, pressed: Pressed) -> None:
        try:
            if pressed.op == "cancel":
                await self._cancel(interaction, pressed)
            elif pressed.op == "remix":
                await self._open_remix(interaction, pressed)
            else:
                await self._start(interaction, pressed)
        except Exception as e:  # one place turns it into a short private answer
            await report(interaction, e)

    def _message_id(self, interaction: discord.Interaction) -> str | None:
        return str(interaction.message.id) if interaction.message is not None else None

    async def _start(self, interaction: discord.Interaction, pressed: Pressed) -> None:
        await self.bot.defer_job(interaction)
        job = await press(
            self.bot.service,
            self.bot.actor(interaction),
            self.bot.place(interaction),
            pressed,
            message_id=self._message_id(interaction),
            idempotency_key=self.bot.key(interaction),
            delivery=self.bot.interaction_delivery(interaction),
        )
        await self._started(interaction, job, pressed.op)

    async def _started(self, interaction: discord.Interaction, job: JobView, what: str) -> None:
        log.info(
            "button %s by %s on job %s -> job %s (%s, %s)",
            what, interaction.user.id, job.parent_id, job.id, job.kind, "new" if job.created else "existing",
        )  # fmt: skip
        await self.bot.show_queued(job)

    async def _cancel(self, interaction: discord.Interaction, pressed: Pressed) -> None:
        await interaction.response.defer()  # an update of the status message the button is on
        job = await self.bot.service.cancel(
            self.bot.actor(interaction), pressed.job_id, self.bot.place(interaction)
        )
        if job.state == "cancelled":
            self.bot.delivery.finished(job.id)
            await interaction.edit_original_response(
                content=messages.cancelled(job), view=None, allowed_mentions=discord.AllowedMentions.none()
            )
            log.info("job %s cancelled by %s", job.id, interaction.user.id)
        else:
            await interaction.followup.send(messages.not_cancelled(job), ephemeral=True)

    async def _open_remix(self, interaction: discord.Interaction, pressed: Pressed) -> None:
        job: JobView | None = None
        try:
            async with asyncio.timeout(PREFILL_WAIT_S):
                job = await self.bot.service.get_job(pressed.job_id)
        except Exception:  # an empty dialog still works; the submit checks everything
            log.info("remix of job %s: no prefill", pressed.job_id, exc_info=True)
        shown_here = job is not None and (
            job.result_message_id == self._message_id(interaction) or job.user_id == str(interaction.user.id)
        )
        text = remix_text(job) if job is not None and shown_here else ""
        modal = RemixModal(job if shown_here else None, pressed.job_id, text)
        await interaction.response.send_modal(modal)
        # The submission is handled by its custom id (below), also after a restart; the instance
        # kept by discord.py would only hold memory until someone submits.
        modal.stop()

    @commands.Cog.listener()
    async def on_interaction(self, interaction: discord.Interaction) -> None:
        if interaction.type != discord.InteractionType.modal_submit:
            return
        data: Mapping[str, Any] = interaction.data or {}
        match = REMIX_FORM.fullmatch(str(data.get("custom_id", "")))
        if match is None:
            return
        try:
            await self.bot.defer_job(interaction)
            values = modal_values(data)
            image = values.get(REMIX_IMAGE, "1").strip() or "1"
            if not image.isdigit() or not 1 <= int(image) <= 4:
                raise BadParameters(
                    "image", f"The image to start from is a number from 1 to 4, not {image!r}."
                )
            job = await self.bot.service.remix(
                self.bot.actor(interaction),
                self.bot.place(interaction),
                values.get(REMIX_TEXT, ""),
                index=int(image) - 1,
                job_id=int(match["job"]),
                message_id=self._message_id(interaction),
                idempotency_key=self.bot.key(interaction),
                delivery=self.bot.interaction_delivery(interaction),
            )
            await self._started(interaction, job, "remix")
        except Exception as e:
            await report(interaction, e)


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(Buttons(bot))
