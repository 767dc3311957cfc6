"""The `[discord]` section of config.toml as a typed, validated value."""

from __future__ import annotations

import math
from dataclasses import dataclass

from bot.settings import ConfigError

# Discord's own limit: an interaction token (followups, edits of the response) is valid 15 minutes.
INTERACTION_TOKEN_TTL_S = 15 * 60


@dataclass(frozen=True)
class DiscordConfig:
    # Guilds to sync the slash commands to (instant; for development and private bots). Empty: sync
    # globally (every server the bot is in; Discord may take a while to show changes).
    guild_ids: tuple[int, ...] = ()
    # Sync the command tree at start-up when it changed since the last sync (its hash is kept in the
    # database, so of several processes starting at once one syncs, and a restart with the same
    # commands syncs nothing). Off: never sync (the commands are managed elsewhere).
    sync_commands: bool = True
    # Sync at start-up even when the tree looks unchanged (commands deleted by hand in Discord's
    # developer portal, another bot sharing the token). `python -m bot --sync-commands` sets it once.
    force_sync_commands: bool = False
    # Besides members with the Manage Server permission, members with one of these roles (names,
    # case-insensitive, or role ids) may use the /admin commands.
    admin_roles: tuple[str, ...] = ()
    # Hide /admin from members without Manage Server (Discord-side default permissions). Members of
    # `admin_roles` then need the command enabled for their role in Server Settings > Integrations.
    hide_admin_commands: bool = True
    # Minimum seconds between two progress edits of one message: Discord rate-limits edits of a
    # message, and a user does not need more than one update every 2 s.
    progress_edit_interval_s: float = 2.0
    # A result is posted as a channel message with the bot token (not through the interaction) when
    # less than this many seconds remain of the 15-minute interaction token: a slow upload must not
    # outlive the token.
    token_margin_s: float = 120.0
    # How long a result is retried while Discord answers 5xx or cannot be reached (an outage),
    # through the interaction while its token lasts, then as a channel message. A restart starts
    # the retries over.
    delivery_retry_s: float = 3600.0
    # Largest /inpaint attachment accepted, bytes. 8 MiB keeps a base64 upload to the inference
    # server under its payload limit and a decoded image well inside memory.
    max_attachment_bytes: int = 8 * 1024 * 1024
    # Number of jobs /history shows (a Discord message holds 2000 characters).
    history_limit: int = 10
    # "Playing ..." status shown under the bot's name; empty for none.
    activity: str = "/imagine"
    # Seconds without a new guild after connecting before the bot counts as ready (discord.py's
    # guild_ready_timeout); raise it for a bot in thousands of guilds.
    guild_ready_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if any(g <= 0 for g in self.guild_ids):
            raise ConfigError("[discord] guild_ids: guild ids are positive integers (snowflakes)")
        if not (math.isfinite(self.guild_ready_timeout_s) and 0 < self.guild_ready_timeout_s <= 600):
            raise ConfigError("[discord] guild_ready_timeout_s: must be > 0 and <= 600 seconds")
        if not (math.isfinite(self.progress_edit_interval_s) and 0 <= self.progress_edit_interval_s <= 3600):
            raise ConfigError("[discord] progress_edit_interval_s: must be from 0 to 3600 seconds")
        if not (math.isfinite(self.delivery_retry_s) and 0 <= self.delivery_retry_s <= 86_400):
            raise ConfigError("[discord] delivery_retry_s: must be from 0 to 86400 seconds")
        if not 0 <= self.token_margin_s < INTERACTION_TOKEN_TTL_S:
            raise ConfigError(f"[discord] token_margin_s: must be in [0, {INTERACTION_TOKEN_TTL_S})")
        # 25 MiB: the most Discord lets a bot upload or download in one request.
        if not 1024 <= self.max_attachment_bytes <= 25 * 1024 * 1024:
            raise ConfigError("[discord] max_attachment_bytes: must be from 1024 to 26214400 (25 MiB)")
        if len(self.activity) > 128:  # Discord's limit for an activity name
            raise ConfigError("[discord] activity: at most 128 characters")
        if not 1 <= self.history_limit <= 25:
            # 25 lines of ~80 characters stay inside one 2000-character message.
            raise ConfigError("[discord] history_limit: must be between 1 and 25")
