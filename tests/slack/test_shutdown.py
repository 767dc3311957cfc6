"""A clean stop with the real Slack adapter against the fake, in the order of `python -m bot` (the
harness's): a result whose files are being uploaded when the stop comes is uploaded, shared and
recorded once before the adapter closes its HTTP session; the next start has nothing to post."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiohttp
import pytest

from bot.core.models import Job
from tests.slack.fake_slack import FakeSlack
from tests.slack.harness import result_messages, running_adapter

pytestmark = pytest.mark.timeout(120)


async def test_a_stop_lets_the_result_being_uploaded_finish_before_the_adapter_closes(
    fake_slack: FakeSlack, tmp_path: Path, http: aiohttp.ClientSession
):
    fake_slack.hold_uploads()
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(
            running_adapter(fake_slack, tmp_path, http, sections={"bot": {"shutdown_grace_s": 5.0}})
        )
        await first.sender.slash_command("/imagine", "a last boat")
        await asyncio.wait_for(fake_slack.upload_waiting.wait(), 60)
        stop = asyncio.create_task(stack.aclose())  # the stop comes while the bytes are on their way
        await fake_slack.wait_for(lambda: first.core.dispatcher._stopping)
        fake_slack.release_uploads()
        await asyncio.wait_for(stop, 30)
    [shown] = result_messages(fake_slack)
    async with running_adapter(fake_slack, tmp_path, http) as second:
        await asyncio.sleep(0.5)  # the dispatcher has looked for work to take over by now
        async with second.core.db.read() as s:
            row = await s.get(Job, 1)
    assert row is not None and (row.delivery_attempts, row.delivery_error) == (1, None)
    assert row.delivered_at is not None and row.result_message_id == f"{shown.channel}:{shown.ts}"
    assert result_messages(fake_slack) == [shown]
    assert len(fake_slack.calls_to("files.completeUploadExternal")) == 1
