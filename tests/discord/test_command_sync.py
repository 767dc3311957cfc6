"""Command sync by one process: several bot processes (App instances: each its own core and real
discord.py bot, one shared database) starting together sync a new command tree once; a restart with
the same tree syncs nothing; a changed tree syncs again; `force_sync_commands` always syncs; a failed
sync is tried again at the next start."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from tests.discord.fake_discord import FakeDiscord
from tests.discord.harness import App, app_config


async def start_together(fake: FakeDiscord, configs: list[dict]) -> contextlib.AsyncExitStack:
    stack = contextlib.AsyncExitStack()
    await asyncio.gather(*(stack.enter_async_context(App(fake, config)) for config in configs))
    return stack


async def test_processes_starting_together_sync_once_then_only_on_change(fake_discord: FakeDiscord, tmp_path):
    config = app_config(tmp_path, fake_discord)
    async with await start_together(fake_discord, [config, config, config]):
        assert [s["guild_id"] for s in fake_discord.command_syncs] == [fake_discord.guild_id]
    first = fake_discord.command_syncs[0]["payload"]

    # A restart with the same commands: nothing to sync.
    async with await start_together(fake_discord, [config, config]):
        pass
    assert len(fake_discord.command_syncs) == 1

    # A changed tree (/admin no longer hidden: its default permissions change): one sync again.
    changed = app_config(tmp_path, fake_discord, discord={"hide_admin_commands": False})
    async with await start_together(fake_discord, [changed, changed]):
        pass
    assert len(fake_discord.command_syncs) == 2
    second = fake_discord.command_syncs[1]["payload"]
    admin_before = next(c for c in first if c["name"] == "admin")
    admin_after = next(c for c in second if c["name"] == "admin")
    assert (
        admin_before["default_member_permissions"] and admin_after.get("default_member_permissions") is None
    )

    # Forced: synced although unchanged.
    forced = app_config(
        tmp_path, fake_discord, discord={"hide_admin_commands": False, "force_sync_commands": True}
    )
    async with App(fake_discord, forced):
        pass
    assert len(fake_discord.command_syncs) == 3

    # Syncing off: never.
    off = app_config(tmp_path, fake_discord, discord={"sync_commands": False})
    async with App(fake_discord, off):
        pass
    assert len(fake_discord.command_syncs) == 3


async def test_a_failed_sync_is_tried_again_at_the_next_start(fake_discord: FakeDiscord, tmp_path):
    from bot.bootstrap import build_core
    from bot.discord_adapter import run

    # Guild 42 refuses the sync (the bot is not in it): the start fails after the first guild synced.
    broken = app_config(tmp_path, fake_discord, discord={"guild_ids": [fake_discord.guild_id, 42]})
    async with build_core(broken, {}) as core:
        with pytest.raises(RuntimeError, match=r"cannot sync commands to guild 42"):
            await run(core.service, broken, {"DISCORD_TOKEN": fake_discord.token})
    assert [s["guild_id"] for s in fake_discord.command_syncs] == [fake_discord.guild_id]
    async with build_core(broken, {}) as core:
        # The fake's guild was synced and recorded; guild 42's failure was not recorded as synced.
        with pytest.raises(RuntimeError, match=r"cannot sync commands to guild 42"):
            await run(core.service, broken, {"DISCORD_TOKEN": fake_discord.token})
    assert [s["guild_id"] for s in fake_discord.command_syncs] == [fake_discord.guild_id]
    tries = [p for m, p in fake_discord.requests if m == "PUT" and p.endswith("/guilds/42/commands")]
    assert len(tries) == 2


def test_the_cli_flag_forces_a_sync(monkeypatch):
    from bot import __main__ as entry

    seen: dict[str, str] = {}

    async def fake_amain(config_file: str, env) -> int:
        seen.update(env)
        return 0

    monkeypatch.setattr(entry, "amain", fake_amain)
    assert entry.main(["--sync-commands"]) == 0
    assert seen["IMAGINE_DISCORD_FORCE_SYNC_COMMANDS"] == "true"
    seen.clear()
    assert entry.main([]) == 0
    assert "IMAGINE_DISCORD_FORCE_SYNC_COMMANDS" not in seen
