"""A bot killed while delivering a result must not post it twice after its restart.

The crash is simulated at the two places it matters, each time with the whole bot (adapter, core,
dispatcher) stopped and a new one started on the same database and the same fake Slack:
- the files were shared in the channel, and recording the result message never returns;
- the files were uploaded and their ids recorded, and `files.completeUploadExternal` never got
  through (the fake never answers it), so nothing was shared.
From the database's side this is what `kill -9` leaves: the job `succeeded`, its result undelivered,
one delivery attempt counted.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bot.slack_adapter import app as slack_app
from tests.slack.fake_slack import FakeSlack
from tests.slack.harness import reaction, result_messages, running_adapter

pytestmark = pytest.mark.timeout(120)


def die_in(service: Any, method: str) -> asyncio.Event:
    """`service.<method>` never returns (the process dies there); the event says it was reached."""
    posted = asyncio.Event()

    async def never_returns(*_args: Any, **_kwargs: Any) -> None:
        posted.set()
        await asyncio.Event().wait()

    setattr(service, method, never_returns)
    return posted


async def recorded_result(service: Any, job_id: int) -> Any:
    async with asyncio.timeout(60):
        while True:
            job = await service.get_job(job_id)
            if job.result_message_id:
                return job
            await asyncio.sleep(0.05)


async def test_shared_result_is_found_through_its_files(
    fake_slack: FakeSlack, tmp_path: Path, http: aiohttp.ClientSession
):
    """Killed after the share, before it was counted as delivered: the next process asks Slack
    where the recorded files went, and records that message instead of posting again."""
    async with running_adapter(fake_slack, tmp_path, http) as first:
        posted = die_in(first.service, "record_shown")
        await first.sender.slash_command("/imagine", "a paper boat --n 2")
        await asyncio.wait_for(posted.wait(), 60)
    [shown] = result_messages(fake_slack)

    async with running_adapter(fake_slack, tmp_path, http) as second:
        job = await recorded_result(second.service, 1)
    assert job.result_message_id == f"{shown.channel}:{shown.ts}"
    assert result_messages(fake_slack) == [shown]
    assert len(fake_slack.calls_to("files.completeUploadExternal")) == 1
    assert job.delivery["result_files"] == ",".join(shown.files)
    assert [m.text for m in fake_slack.messages.values() if not m.files] == []  # the status went


async def test_a_result_recorded_as_shown_is_not_posted_again(
    fake_slack: FakeSlack, tmp_path: Path, http: aiohttp.ClientSession
):
    """Stopped after the share was counted as delivered, while its message id was being recorded
    (the window in which a SIGTERM used to post the result twice): the next process posts nothing;
    a reaction on the result finds its job through the result's files."""
    async with running_adapter(fake_slack, tmp_path, http) as first:
        posted = die_in(first.service, "attach_result_message")
        await first.sender.slash_command("/imagine", "a paper crane")
        await asyncio.wait_for(posted.wait(), 60)
    [shown] = result_messages(fake_slack)

    async with running_adapter(fake_slack, tmp_path, http) as second:
        await asyncio.sleep(0.5)  # the dispatcher has looked for work to take over by now
        assert result_messages(fake_slack) == [shown]
        await second.sender.event(reaction("repeat", shown))
        await fake_slack.wait_for(lambda: len(result_messages(fake_slack)) == 2)
        job = await recorded_result(second.service, 1)
        reroll = await second.service.get_job(2)
    assert len(fake_slack.calls_to("files.completeUploadExternal")) == 2  # the original once, the re-roll
    assert job.result_message_id == f"{shown.channel}:{shown.ts}"
    assert (reroll.kind, reroll.parent_id) == ("reroll", 1)


async def test_files_never_shared_are_uploaded_again_once(
    fake_slack: FakeSlack, tmp_path: Path, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
):
    # Slack shares asynchronously; the fake's answer is immediate, so a short look is enough here.
    monkeypatch.setattr(slack_app, "SHARE_POLL_DELAYS_S", (0.0, 0.05))
    fake_slack.stall("files.completeUploadExternal")
    async with running_adapter(fake_slack, tmp_path, http) as first:
        await first.sender.slash_command("/imagine", "a paper plane")
        await fake_slack.wait_for(
            lambda: [c for c in fake_slack.calls if c.method == "files.completeUploadExternal"]
        )
        recorded = (await first.service.get_job(1)).delivery["result_files"]
    assert result_messages(fake_slack) == []
    fake_slack.unstall()

    async with running_adapter(fake_slack, tmp_path, http) as second:
        job = await recorded_result(second.service, 1)
    [shown] = result_messages(fake_slack)
    assert job.result_message_id == f"{shown.channel}:{shown.ts}"
    assert shown.files and recorded not in shown.files  # the new upload, shared once
    assert job.delivery["result_files"] == ",".join(shown.files)
