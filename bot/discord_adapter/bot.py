"""The discord.py `commands.Bot`: one cog per feature, one error handler, the core's delivery."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Sequence

import discord
from discord import app_commands
from discord.ext import commands

from bot.core.api import Actor, ImageService, JobView, NotAllowedHere, Place, PlaceRules
from bot.core.controls import Pressed
from bot.discord_adapter import errors
from bot.discord_adapter.config import DiscordConfig
from bot.discord_adapter.controls import ControlButton
from bot.discord_adapter.delivery import DiscordDelivery

log = logging.getLogger(__name__)

PLATFORM = "discord"

# How long a command waits for its channel's rules before it answers (Discord wants an answer
# within 3 s); past that it answers privately, the side that leaks nothing.
RULES_TIMEOUT_S = 1.5


def intents() -> discord.Intents:
    """Only what is used: guilds (channels, roles for the admin check), reactions on results.
    No message content, no members list, no presences (privileged intents are not needed)."""
    return discord.Intents(guilds=True, guild_reactions=True)


def is_admin(
    member: discord.abc.User | None, permissions: discord.Permissions | None, admin_roles: Sequence[str]
) -> bool:
    if permissions is not None and (permissions.manage_guild or permissions.administrator):
        return True
    wanted = {r.strip().lower() for r in admin_roles}
    for role in getattr(member, "roles", ()):
        if str(role.id) in wanted or role.name.lower() in wanted:
            return True
    return False


class ImagineTree(app_commands.CommandTree):
    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        await errors.report(interaction, error)


class ImagineBot(commands.Bot):
    """Translates Discord events into core requests and core results into messages; decides nothing."""

    def __init__(self, service: ImageService, config: DiscordConfig):
        super().__init__(
            command_prefix=commands.when_mentioned,  # no prefix commands; slash commands only
            intents=intents(),
            tree_cls=ImagineTree,
            activity=discord.Game(config.activity) if config.activity else None,
            # Nobody is pinged unless a message says whom (results ping their requester only): a
            # `<@someone>` typed into a prompt must not ping that person.
            allowed_mentions=discord.AllowedMentions.none(),
            help_command=None,
            guild_ready_timeout=config.guild_ready_timeout_s,
        )
        self.service = service
        self.config = config
        self.delivery = DiscordDelivery(self, config)

    async def setup_hook(self) -> None:
        from bot.discord_adapter.cogs import account, admin, buttons, imagine, inpaint, models, reactions

        for module in (imagine, inpaint, reactions, buttons, account, models, admin):
            await module.setup(self)
        # Buttons are matched by their custom id, on any message, also after a restart.
        self.add_dynamic_items(ControlButton)
        self.service.register_delivery(PLATFORM, self.delivery)
        if self.config.sync_commands:
            await self.sync_commands()

    async def sync_commands(self) -> None:
        """Sync the command tree to each guild of `guild_ids` (or globally) whose payload changed
        since the last sync by any process (the core keeps its hash); `force_sync_commands` syncs
        regardless."""
        targets: list[discord.Object | None] = [discord.Object(g) for g in self.config.guild_ids] or [None]
        for guild in targets:
            if guild is not None:
                self.tree.copy_global_to(guild=guild)
            where = f"guild {guild.id}" if guild is not None else "global"
            key = f"discord:commands:{self.application_id}:{where.replace(' ', ':')}"
            digest = self.command_digest(guild)
            claimed = await self.service.claim_publication(key, digest)
            if not claimed and not self.config.force_sync_commands:
                log.info("commands (%s) unchanged since the last sync: not syncing", where)
                continue
            try:
                synced = await self.tree.sync(guild=guild)
            except discord.Forbidden as e:
                await self._sync_failed(key, digest)
                raise RuntimeError(
                    f"[discord] guild_ids: cannot sync commands to guild {guild and guild.id} ({e.text}): the "
                    "bot is not in that server, or was invited without the applications.commands scope "
                    "(invite it again with the URL from the README)"
                ) from None
            except BaseException:
                await self._sync_failed(key, digest)
                raise
            if guild is not None:
                log.info("synced %d commands to guild %s", len(synced), guild.id)
            else:
                log.info("synced %d global commands (Discord may take a while to show changes)", len(synced))

    def command_digest(self, guild: discord.abc.Snowflake | None) -> str:
        """The sha256 of what `tree.sync(guild=guild)` would send (the commands' JSON payload)."""
        payload = [command.to_dict(self.tree) for command in self.tree.get_commands(guild=guild)]
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    async def _sync_failed(self, key: str, digest: str) -> None:
        # The next start must try again rather than take the tree for synced.
        try:
            await self.service.publication_failed(key, digest)
        except Exception:
            log.exception("could not record the failed command sync; the next start may not sync")

    async def close(self) -> None:
        self.service.unregister_delivery(PLATFORM)
        await self.delivery.close()
        await super().close()

    async def on_control(self, interaction: discord.Interaction, pressed: Pressed) -> None:
        """A click on one of our buttons (see `controls.ControlButton`)."""
        from bot.discord_adapter.cogs.buttons import Buttons

        cog = self.get_cog("Buttons")
        assert isinstance(cog, Buttons), "the buttons cog is loaded in setup_hook"
        await cog.on_control(interaction, pressed)

    async def on_ready(self) -> None:
        log.info(
            "logged in as %s (%s) in %d guild(s)", self.user, self.user and self.user.id, len(self.guilds)
        )

    async def show_queued(self, job: JobView) -> None:
        """The first status of a job just submitted: its queue position, at once. The core reports
        later positions, progress and the result through the delivery (which ignores this if the
        core's own report or the job's start was shown meanwhile)."""
        if not job.created or job.state != "queued":
            return
        try:
            position = await self.service.queue_position(job.id)
        except Exception:  # the status shows without it; the core reports it shortly
            log.warning("job %s: queue position unavailable", job.id, exc_info=True)
            position = None
        await self.delivery.show_first_status(job, position)

    # -- translation helpers used by the cogs -----------------------------------------------------

    async def defer_job(self, interaction: discord.Interaction) -> None:
        """Acknowledge a command or button that starts a job: refused at once (privately) where the
        guild allows image commands only in other channels, else deferred privately in private mode
        (the result then edits that private response) and publicly elsewhere."""
        try:
            async with asyncio.timeout(RULES_TIMEOUT_S):
                rules = await self.service.place_rules(self.place(interaction))
        except TimeoutError:
            log.warning("channel rules of %s not read in time; answering privately", interaction.channel_id)
            rules = PlaceRules(private=True)
        if not rules.allowed:
            raise NotAllowedHere(rules.allowed_channels)  # errors.report answers it privately
        await errors.defer(interaction, ephemeral=rules.private)

    def actor(self, interaction: discord.Interaction) -> Actor:
        user = interaction.user
        admin = is_admin(
            user, interaction.permissions if interaction.guild_id else None, self.config.admin_roles
        )
        # The member's roles (ids; @everyone's is the guild's): the core applies role limits.
        roles = tuple(str(r.id) for r in getattr(user, "roles", ()))
        return Actor(PLATFORM, str(user.id), user.display_name, admin, roles)

    @staticmethod
    def place(interaction: discord.Interaction) -> Place:
        return Place(
            PLATFORM,
            str(interaction.guild_id) if interaction.guild_id else None,
            str(interaction.channel_id) if interaction.channel_id else None,
        )

    @staticmethod
    def interaction_delivery(interaction: discord.Interaction) -> dict:
        """What the delivery needs to answer this interaction later, even after a restart."""
        return {
            "mode": "interaction",
            "application_id": str(interaction.application_id),
            "interaction_id": str(interaction.id),
            "token": interaction.token,
            "channel_id": str(interaction.channel_id),
            "guild_id": str(interaction.guild_id) if interaction.guild_id else None,
            "size_limit": interaction.filesize_limit,
        }

    @staticmethod
    def key(interaction: discord.Interaction) -> str:
        return f"interaction:{interaction.id}"
