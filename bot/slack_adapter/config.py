"""The `[slack]` section of config.toml as a frozen dataclass, checked at start-up.

Secrets (bot token, signing secret, app token) never live here: they come from the environment.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from bot.settings import ConfigError

_USER_ID = re.compile(r"^[UW][A-Z0-9]{2,}$")
_COMMAND = re.compile(r"^/[a-z0-9_\-]{1,31}$")  # Slack: lower case, at most 32 characters with the slash


@dataclass(frozen=True)
class SlackConfig:
    # HTTP mode (used when SLACK_APP_TOKEN is not set): where Bolt's aiohttp app listens.
    http_host: str = "0.0.0.0"
    http_port: int = 3000
    http_path: str = "/slack/events"
    # Users allowed to run /imagine-admin besides workspace admins and owners.
    admin_user_ids: tuple[str, ...] = ()
    # Workspace admins/owners (users.info is_admin/is_owner) count as bot admins.
    workspace_admins_are_admins: bool = True
    # How long users.info answers about admin status are trusted.
    admin_cache_s: float = 300.0
    # Minimum seconds between two progress edits of one status message.
    progress_interval_s: float = 2.0
    imagine_command: str = "/imagine"
    admin_command: str = "/imagine-admin"
    # callback_id of the "Inpaint…" message shortcut (must match slack_manifest.yaml).
    inpaint_shortcut_callback_id: str = "imagine_inpaint"
    # Largest attachment the bot downloads for inpainting, in bytes.
    max_attachment_bytes: int = 10 * 1024 * 1024
    # The bot also reacts to its own results with the reaction controls (🔁, 1️⃣-4️⃣). Off: the
    # buttons under each result say what is possible, and each hint is a rate-limited call.
    add_reaction_hints: bool = False
    # Where files may be downloaded from with the bot token (scheme://host[:port]): Slack's own
    # file hosts. A file linking anywhere else (a remote file, a crafted event) is refused, so the
    # token never reaches another server.
    file_hosts: tuple[str, ...] = ("https://files.slack.com",)
    # How often a rate-limited (429) Web API call is retried after its Retry-After.
    rate_limit_retries: int = 3
    # Slack Web API base URL; change only for GovSlack (https://slack-gov.com/api/) or a test fake.
    api_base_url: str = "https://slack.com/api/"

    def __post_init__(self) -> None:
        if not 0 <= self.http_port <= 65535:
            raise ConfigError(f"[slack] http_port: must be 0-65535, got {self.http_port}")
        if not self.http_path.startswith("/"):
            raise ConfigError(f"[slack] http_path: must start with '/', got {self.http_path!r}")
        for uid in self.admin_user_ids:
            if not _USER_ID.match(uid):
                raise ConfigError(f"[slack] admin_user_ids: {uid!r} is not a Slack user id (like U012ABCDEF)")
        for key in ("imagine_command", "admin_command"):
            value = getattr(self, key)
            if not _COMMAND.match(value):
                raise ConfigError(
                    f"[slack] {key}: must look like '/imagine' (lower case, <= 32 chars), got {value!r}"
                )
        if self.imagine_command == self.admin_command:
            raise ConfigError("[slack] admin_command: must differ from imagine_command")
        # Slack allows roughly one chat.update per second per channel; 1 s is the floor, 2 s the
        # default so that a few concurrent jobs in one channel stay under it.
        if not (math.isfinite(self.progress_interval_s) and 1.0 <= self.progress_interval_s <= 3600):
            raise ConfigError(
                f"[slack] progress_interval_s: must be from 1.0 to 3600 seconds, got {self.progress_interval_s}"
            )
        # 100 MiB: a download is held in memory, and the core refuses more than [bot] max_upload_bytes.
        if not 0 < self.max_attachment_bytes <= 100 * 1024 * 1024:
            raise ConfigError(
                f"[slack] max_attachment_bytes: must be from 1 to 104857600 (100 MiB), got {self.max_attachment_bytes}"
            )
        if not 0 <= self.rate_limit_retries <= 10:
            raise ConfigError(f"[slack] rate_limit_retries: must be 0-10, got {self.rate_limit_retries}")
        if not (math.isfinite(self.admin_cache_s) and 0 <= self.admin_cache_s <= 86_400):
            raise ConfigError(
                f"[slack] admin_cache_s: must be from 0 to 86400 seconds, got {self.admin_cache_s}"
            )
        if not 1 <= len(self.inpaint_shortcut_callback_id) <= 255:  # Slack's limit for a callback_id
            raise ConfigError("[slack] inpaint_shortcut_callback_id: must be 1 to 255 characters")
        for origin in self.file_hosts:
            parsed = urlsplit(origin)
            if parsed.scheme not in ("https", "http") or not parsed.hostname or parsed.path not in ("", "/"):
                raise ConfigError(
                    f"[slack] file_hosts: {origin!r} is not an origin like 'https://files.slack.com'"
                )
        if not self.api_base_url.endswith("/"):
            # slack_sdk appends the method name directly: without the slash it builds ".../apiauth.test".
            raise ConfigError(f"[slack] api_base_url: must end with '/', got {self.api_base_url!r}")
