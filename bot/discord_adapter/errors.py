"""The one place where errors become the short text a Discord user sees; tracebacks go to the log."""

from __future__ import annotations

import logging
import uuid

import discord
from discord import app_commands

from bot.core.api import BadParameters, CoreError, QuotaExceeded

log = logging.getLogger(__name__)


class AttachmentError(BadParameters):
    """An /inpaint attachment the adapter refuses before the core sees it (type, size, download)."""


def user_message(error: BaseException) -> str:
    """A short sentence for the user; logs what the user must not see."""
    if isinstance(error, app_commands.CommandInvokeError):
        error = error.original
    if isinstance(error, QuotaExceeded):
        return f"⛔ {error.message} (<t:{int(error.reset_at.timestamp())}:R>)"
    if isinstance(error, CoreError):
        return f"⛔ {error.message}"
    if isinstance(error, app_commands.CheckFailure):
        return "⛔ Only members with Manage Server or an admin role can use this command."
    if isinstance(error, app_commands.TransformerError):
        return f"⛔ Invalid value {error.value!r} for this option."
    if isinstance(error, app_commands.CommandOnCooldown):
        return f"⛔ Slow down: try again in {error.retry_after:.0f} s."
    ref = uuid.uuid4().hex[:8]
    log.error("unexpected error (ref %s)", ref, exc_info=error)
    return f"⚠️ Something went wrong on our side (ref {ref}). It has been logged; please try again."


async def defer(interaction: discord.Interaction, *, ephemeral: bool) -> None:
    """Acknowledge first (Discord's 3-second deadline), remember how, and only then do any work."""
    interaction.extras["ephemeral"] = ephemeral
    await interaction.response.defer(thinking=True, ephemeral=ephemeral)


async def report(interaction: discord.Interaction, error: BaseException) -> None:
    """Show `error` to the user who ran the command, privately, whatever state the response is in."""
    text = user_message(error)
    if isinstance(error, app_commands.CommandInvokeError):
        error = error.original
    if isinstance(error, CoreError):
        log.info(
            "refused %s for user %s: %s: %s",
            interaction.command and interaction.command.qualified_name,
            interaction.user.id,
            error.code,
            error.message,
        )
    try:
        if not interaction.response.is_done():
            await interaction.response.send_message(text, ephemeral=True)
            return
        if not interaction.extras.get("ephemeral", True):
            # The public "thinking…" message would otherwise stay forever; the error is private.
            try:
                await interaction.delete_original_response()
            except discord.HTTPException:
                log.debug("could not delete the deferred response of %s", interaction.id)
        await interaction.followup.send(text, ephemeral=True)
    except discord.HTTPException:
        log.exception("could not tell user %s about an error", interaction.user.id)
