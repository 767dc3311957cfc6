"""Buttons and the defects of issue 21 on Slack, through the real Bolt app and the real core against
the fake Slack: each operation from its button with its geometry, cancel, the remix dialog,
image-to-image from a mention, the bot token kept to Slack's file hosts, a share that shows up late,
a stop while the share is looked for, and a Slack that refuses the buttons."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

from bot.slack_adapter import app as slack_app
from tests.slack.fake_slack import FakeSlack
from tests.slack.harness import Running, result_messages, running_adapter
from tests.slack.images import opaque_png

pytestmark = pytest.mark.timeout(120)


async def result(slack: Running, count: int):
    await slack.fake.wait_for(lambda: len(result_messages(slack.fake)) >= count)
    return result_messages(slack.fake)[count - 1]


async def job_of(slack: Running, msg):
    for _ in range(200):
        job = await slack.service.job_for_message("slack", f"{msg.channel}:{msg.ts}")
        if job is not None:
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"message {msg.ts} never resolved to a job")


def size_of(slack: Running, msg) -> tuple[int, int]:
    return Image.open(io.BytesIO(slack.fake.files[msg.files[0]].data)).size


async def test_operations_cancel_and_remix_through_buttons(slack: Running):
    fake = slack.fake
    await slack.sender.slash_command("/imagine", "a windmill --n 2 --seed 4")
    grid = await result(slack, 1)
    parent = await job_of(slack, grid)

    # U1 by someone else in the channel
    # Acked while the backend is held: the ack did not wait for the upscale (Slack allows 3 s; how
    # long it took on this machine is not asserted).
    slack.backend.hold()
    try:
        async with asyncio.timeout(60):
            reply, _ = await slack.sender.block_action(grid, f"imagine:up:{parent.id}:0", user_id="UBOB0001")
    finally:
        slack.backend.release()
    assert reply.status == 200
    upscaled = await result(slack, 2)
    up = await job_of(slack, upscaled)
    assert (up.kind, up.parent_id, up.user_id, size_of(slack, upscaled)) == (
        "upscale",
        parent.id,
        "UBOB0001",
        (128, 128),
    )
    assert len(fake.buttons(upscaled)) == 11  # one image: upscale, 2 vary, re-roll, remix, 2 zooms, 4 pans

    await slack.sender.block_action(upscaled, f"imagine:zoom:{up.id}:1.5", user_id="UBOB0001")
    zoomed = await result(slack, 3)
    zoom = await job_of(slack, zoomed)
    assert (zoom.kind, zoom.params.detail, size_of(slack, zoomed)) == ("zoom", "1.5x", (192, 192))
    inpaint = slack.backend.calls[-1].params
    mask = Image.open(io.BytesIO(inpaint.mask)).convert("L")
    assert mask.getpixel((0, 0)) == 255 and mask.getpixel((95, 95)) == 0  # border repainted, centre kept
    assert mask.point(lambda v: 255 - v).getbbox() == (32, 32, 160, 160)

    # Remix: a dialog prefilled with the prompt and flags, and a choice of image for a grid
    await slack.sender.block_action(grid, f"imagine:remix:{parent.id}")
    await fake.wait_for(lambda: fake.views)
    view = fake.views[-1]["view"]
    prompt_el = view["blocks"][0]["element"]
    assert prompt_el["initial_value"] == "a windmill --n 2 --steps 20 --guidance 7.5"
    assert [o["value"] for o in view["blocks"][1]["element"]["options"]] == ["1", "2"]
    await slack.sender.view_submission(
        view,
        {"prompt": {"prompt": {"value": "a stone windmill --strength 0.4"}},
         "image": {"image": {"selected_option": {"value": "2"}}}},
    )  # fmt: skip
    remixed = await result(slack, 4)
    remix = await job_of(slack, remixed)
    assert (remix.kind, remix.prompt, remix.parent_image_index, remix.params.strength) == (
        "remix", "a stone windmill", 1, 0.4,
    )  # fmt: skip

    # Cancel: a held job's status carries a Cancel button; pressing it ends the job there
    slack.backend.hold()
    await slack.sender.slash_command("/imagine", "never mind", user_id="UBOB0001")
    status = await fake.wait_for(
        lambda: next((m for m in fake.messages.values() if "never mind" in m.text and fake.buttons(m)), None)
    )
    [cancel_id] = fake.buttons(status)
    await slack.sender.block_action(status, cancel_id, user_id="UALICE01")  # not hers: refused
    await fake.wait_for(lambda: any("Only admins" in e["text"] for e in fake.ephemerals))
    await slack.sender.block_action(status, cancel_id, user_id="UBOB0001")
    await fake.wait_for(lambda: "cancelled" in status.text)
    slack.backend.release()
    job = await slack.service.get_job(int(cancel_id.rsplit(":", 1)[1]))
    assert job.state == "cancelled" and status.blocks and fake.buttons(status) == []
    await asyncio.sleep(0.3)
    assert len(result_messages(fake)) == 4  # nothing came after the cancellation


async def test_image_to_image_by_mention_and_the_token_kept_to_slack(slack: Running):
    fake = slack.fake
    photo = fake.host_file("photo.png", opaque_png(96))
    await slack.sender.event(
        {"type": "app_mention", "user": "UALICE01", "channel": "CGENERAL1", "ts": "1.2",
         "text": "<@UBOT0001> a watercolour harbour --strength 0.5", "files": [photo]}
    )  # fmt: skip
    shown = await result(slack, 1)
    job = await job_of(slack, shown)
    assert (job.kind, job.params.task, job.params.strength, job.prompt) == (
        "imagine", "img2img", 0.5, "a watercolour harbour",
    )  # fmt: skip
    assert slack.backend.calls[0].params.image is not None

    # A file that links outside Slack: refused by name, the token never sent there.
    elsewhere = {**photo, "id": "FEVIL0001", "name": "trap.png",
                 "url_private": "https://attacker.example/files/trap.png",
                 "url_private_download": "https://attacker.example/files/trap.png"}  # fmt: skip
    await slack.sender.event(
        {"type": "app_mention", "user": "UALICE01", "channel": "CGENERAL1", "ts": "1.3",
         "text": "<@UBOT0001> a harbour", "files": [elsewhere]}
    )  # fmt: skip
    refusal = await fake.wait_for(lambda: [e["text"] for e in fake.ephemerals if "trap.png" in e["text"]])
    assert "not stored in Slack" in refusal[0] and "attacker.example" in refusal[0]
    assert len(slack.backend.calls) == 1


async def test_a_late_share_still_gets_its_message_id(
    fake_slack: FakeSlack, tmp_path: Path, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(slack_app, "SHARE_POLL_DELAYS_S", (0.0, 0.05))
    monkeypatch.setattr(slack_app, "LATE_SHARE_DELAYS_S", (0.2, 0.4, 0.8, 1.6))
    fake_slack.share_delay_s = 1.0  # longer than the first look, shorter than the background one
    async with running_adapter(fake_slack, tmp_path, http) as slack:
        await slack.sender.slash_command("/imagine", "a slow share")
        shown = await result(slack, 1)
        job = await job_of(slack, shown)
    assert job.result_message_id == f"{shown.channel}:{shown.ts}"


async def test_a_stop_while_the_share_is_looked_for_posts_nothing_twice(
    fake_slack: FakeSlack, tmp_path: Path, http: aiohttp.ClientSession
):
    """SIGTERM's path (the adapter and the core stopped cleanly) while files.info is polled: the job
    was recorded as delivered when the share completed, so the next process posts nothing."""
    fake_slack.share_delay_s = 3600.0  # never shown within the look
    async with running_adapter(fake_slack, tmp_path, http) as first:
        await first.sender.slash_command("/imagine", "a restless share")
        await fake_slack.wait_for(lambda: fake_slack.calls_to("files.info"))
    async with running_adapter(fake_slack, tmp_path, http) as second:
        await asyncio.sleep(1.0)  # time to take over anything left undelivered
        job = await second.service.get_job(1)
    assert len(fake_slack.calls_to("files.completeUploadExternal")) == 1
    assert len(result_messages(fake_slack)) == 1 and job.state == "succeeded"


async def test_a_slack_that_refuses_the_buttons_still_gets_the_result(
    fake_slack: FakeSlack, tmp_path: Path, http: aiohttp.ClientSession
):
    fake_slack.refuse_upload_blocks = True
    async with running_adapter(fake_slack, tmp_path, http) as slack:
        await slack.sender.slash_command("/imagine", "a plain result --seed 3")
        shown = await result(slack, 1)
        job = await job_of(slack, shown)
    assert "a plain result" in shown.text and "seed 3" in shown.text and fake_slack.buttons(shown) == []
    assert job.state == "succeeded"


async def test_buttons_work_after_a_restart(
    fake_slack: FakeSlack, tmp_path: Path, http: aiohttp.ClientSession
):
    async with running_adapter(fake_slack, tmp_path, http) as first:
        await first.sender.slash_command("/imagine", "a lantern --n 2")
        grid = await result(first, 1)
        parent = await job_of(first, grid)
    async with running_adapter(fake_slack, tmp_path, http) as second:
        await second.sender.block_action(grid, f"imagine:var:{parent.id}:1", user_id="UBOB0001")
        variation = await job_of(second, await result(second, 2))
    assert (variation.kind, variation.parent_id, variation.parent_image_index) == ("variation", parent.id, 1)
