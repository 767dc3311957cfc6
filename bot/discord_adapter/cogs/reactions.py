"""Reactions on a result: 🔁 re-roll, 1️⃣-4️⃣ / 🎨 variation, for the user who reacted.

Resolved through the core (message id -> job row), so results posted before a restart still work.
Reactions by bots and on other messages are ignored. The bot adds no reactions of its own: the
buttons under each result (`cogs/buttons.py`) say what is possible.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import discord
from discord.ext import commands

from bot.core.api import REACTION_ACTIONS, Actor, Place
from bot.discord_adapter.bot import PLATFORM, is_admin
from bot.discord_adapter.errors import user_message

if TYPE_CHECKING:
    from bot.discord_adapter.bot import ImagineBot

log = logging.getLogger(__name__)

# A refusal posted in the channel (quota, ban...) disappears after this long: it is for one person.
REFUSAL_TTL_S = 30


class Reactions(commands.Cog):
    def __init__(self, bot: ImagineBot):
        self.bot = bot

    @commands.Cog.listener()
    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        me = self.bot.user
        if me is None or payload.user_id == me.id or payload.guild_id is None:
            return
        member = payload.member
        if member is None or member.bot:
            return
        emoji = str(payload.emoji)
        if payload.emoji.id is not None or emoji not in REACTION_ACTIONS:
            return  # custom emoji or one that means nothing here: no database work
        actor = Actor(
            PLATFORM,
            str(member.id),
            member.display_name,
            is_admin(member, member.guild_permissions, self.bot.config.admin_roles),
            tuple(str(r.id) for r in member.roles),  # role limits apply to reactions' jobs too
        )
        place = Place(PLATFORM, str(payload.guild_id), str(payload.channel_id))
        delivery = {
            "mode": "channel",
            "channel_id": str(payload.channel_id),
            "guild_id": str(payload.guild_id),
            "reply_to": str(payload.message_id),
        }
        # The gateway may replay an event after a reconnect: one job per (message, user, emoji).
        key = f"reaction:{payload.message_id}:{member.id}:{emoji}"
        try:
            job = await self.bot.service.react(
                actor, place, str(payload.message_id), emoji, idempotency_key=key, delivery=delivery
            )
        except Exception as e:  # CoreError: a short refusal; anything else: logged with a ref
            await self._refuse(payload, member, user_message(e))
            return
        if job is not None:
            log.info(
                "reaction %s by %s on %s -> job %s (%s)",
                emoji,
                member.id,
                payload.message_id,
                job.id,
                job.kind,
            )

    async def _refuse(
        self, payload: discord.RawReactionActionEvent, member: discord.Member, text: str
    ) -> None:
        channel = self.bot.get_partial_messageable(payload.channel_id, guild_id=payload.guild_id)
        try:
            await channel.send(
                f"{member.mention} {text}",
                delete_after=REFUSAL_TTL_S,
                allowed_mentions=discord.AllowedMentions(users=[member]),
            )
        except discord.HTTPException:
            log.exception("could not tell user %s about a refused reaction", member.id)


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(Reactions(bot))
