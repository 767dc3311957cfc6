"""A clean stop (SIGTERM) of `python -m bot` (its `amain`, in this process) with the real Discord
adapter against the fake: a result being posted when the signal comes is posted and recorded once,
before the adapter closes its HTTP session, and the next start has nothing left to deliver.

CI saw the other order: the adapter closed first, the post in flight failed with "Session is
closed", and the job was recorded as delivered with an error (so nobody ever delivered it)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

from bot.__main__ import amain
from bot.backends.fake import FakeBackend
from bot.core.db import Database, make_engine
from bot.core.models import Job
from tests.discord.fake_discord import FakeDiscord
from tests.discord.harness import App, app_config, result_job, wait_result

ORIGINAL = r"/messages/@original$"


def write_toml(path: Path, config: dict[str, dict[str, Any]]) -> None:
    """The harness's config as a file, for `amain` (JSON scalars and lists are TOML too)."""
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")


def logged(caplog: Any, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)


async def job_row(config: dict[str, Any], job_id: int) -> Job:
    db = Database(make_engine(config["database"]["url"]))
    try:
        async with db.read() as s:
            row = await s.get(Job, job_id)
            assert row is not None
            return row
    finally:
        await db.close()


async def test_sigterm_lets_the_result_being_posted_finish_before_the_adapter_closes(
    fake_discord: FakeDiscord, tmp_path, caplog
):
    caplog.set_level(logging.INFO)
    alice = fake_discord.user("alice")
    config = app_config(tmp_path, fake_discord, bot={"shutdown_grace_s": 5.0})  # the default
    config_file = tmp_path / "config.toml"
    write_toml(config_file, config)
    env = {"DISCORD_TOKEN": fake_discord.token, "IMAGINE_PLAYGROUND_ENABLED": "false"}
    bot = asyncio.create_task(amain(str(config_file), env))
    await fake_discord.wait_for(lambda: logged(caplog, "logged in as"), within=60, what="the bot's login")

    held = fake_discord.hold_next("PATCH", ORIGINAL, with_files=True)  # the result's upload
    rec = await fake_discord.slash("imagine", alice, {"prompt": "a last light"})
    await fake_discord.wait_for(held.arrived.is_set, what="the result's post")
    os.kill(os.getpid(), signal.SIGTERM)  # amain's own handler: a clean stop
    # The stop waits for the post in flight (within [bot] shutdown_grace_s) with the adapter open.
    await fake_discord.wait_for(lambda: logged(caplog, "being delivered"), what="the stop's grace")
    held.release()
    assert await asyncio.wait_for(bot, 30) == 0

    row = await job_row(config, 1)
    assert (row.state, row.delivery_error, row.delivery_attempts) == ("succeeded", None, 1)
    assert row.delivered_at is not None and row.result_message_id == str(rec.original["id"])
    assert len([e for e in rec.edits if e["_files"]]) == 1 and rec.original["attachments"]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []  # a clean stop
    posts = len(fake_discord.requests)
    async with App(fake_discord, config):  # the next start: nothing left to deliver
        await asyncio.sleep(0.3)  # room for a second post, which must not come (no timing asserted)
    assert [r for r in fake_discord.requests[posts:] if r[1].endswith("/@original")] == []


async def test_a_status_message_cut_off_by_the_stop_is_not_posted_again(fake_discord: FakeDiscord, tmp_path):
    """A reaction's job shows its status as a channel message. The stop cuts its send after
    Discord made the message and before the bot kept its id: the next start sends the status again
    with the same nonce, gets that message back, and turns it into the result (one message)."""
    alice, carol = fake_discord.user("alice"), fake_discord.user("carol")
    config = app_config(tmp_path, fake_discord)
    backend = FakeBackend()
    async with App(fake_discord, config, backend=backend) as first:
        rec = await fake_discord.slash("imagine", alice, {"prompt": "a lighthouse"})
        parent = await wait_result(fake_discord, rec)
        await result_job(first, parent)
        backend.hold()  # the variation stays generating: the stop hands it back
        held = fake_discord.hold_next("POST", r"/channels/\d+/messages$")  # its status message
        await fake_discord.react(int(parent["id"]), "🔁", carol)
        await fake_discord.wait_for(held.arrived.is_set, what="the status message's send")
    held.release()  # Discord makes the message the stopped bot never heard back about
    [status] = await fake_discord.wait_for(fake_discord.channel_messages, what="the status message")
    row = await job_row(config, 2)
    assert row.state == "queued" and "status_message_id" not in (row.delivery or {})

    async with App(fake_discord, config) as second:
        result = await fake_discord.wait_for(
            lambda: [m for m in fake_discord.channel_messages() if m["attachments"]], what="the result"
        )
        job = await result_job(second, result[0])
    assert job.kind == "reroll" and job.result_message_id == status["id"]
    assert [m["id"] for m in fake_discord.channel_messages()] == [status["id"]]  # one message, not two
