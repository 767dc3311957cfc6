"""Buttons through the real discord.py against the fake Discord: each operation end to end with its
geometry, the remix dialog, cancel on a status message, and buttons that outlive a restart."""

from __future__ import annotations

import asyncio
import io

from PIL import Image, ImageChops

from bot.backends.fake import FakeBackend
from bot.core.api import Actor, Place
from tests.discord.fake_discord import FakeDiscord
from tests.discord.harness import App, app_config, image_size, result_job, wait_ephemeral, wait_result


def place(fake: FakeDiscord) -> Place:
    return Place("discord", str(fake.guild_id), str(fake.channel_id))


def find(ids: list[list[str]], prefix: str) -> str:
    return next(cid for row in ids for cid in row if cid.startswith(prefix))


async def test_each_operation_through_its_button(fake_discord: FakeDiscord, tmp_path):
    alice, bob = fake_discord.user("alice"), fake_discord.user("bob")
    backend = FakeBackend()
    async with App(fake_discord, app_config(tmp_path, fake_discord), backend=backend) as app:
        rec = await fake_discord.slash("imagine", alice, {"prompt": "a harbour", "count": 2, "seed": 3})
        grid = await wait_result(fake_discord, rec)
        parent = await result_job(app, grid)

        # U2 by someone else in the channel: an upscale of image 2, in a message of its own.
        up_click = await fake_discord.click(grid, f"imagine:up:{parent.id}:1", bob)
        upscaled = await wait_result(fake_discord, up_click)
        up = await result_job(app, upscaled)
        # a single image gets the single-image rows: upscale/vary/re-roll/remix, zooms, pans
        single_ids = fake_discord.button_ids(upscaled)
        assert [len(row) for row in single_ids] == [5, 2, 4]

        zoom_click = await fake_discord.click(upscaled, f"imagine:zoom:{up.id}:2", bob)
        pan_click = await fake_discord.click(upscaled, f"imagine:pan:{up.id}:left", bob)
        subtle_click = await fake_discord.click(upscaled, f"imagine:vary:{up.id}:subtle", bob)
        zoomed, panned, varied = [
            await wait_result(fake_discord, c) for c in (zoom_click, pan_click, subtle_click)
        ]
        zoom, pan, subtle = [await result_job(app, m) for m in (zoomed, panned, varied)]
        bob_quota = await app.service.quota(Actor("discord", str(bob.id)), place(fake_discord))
        history = await wait_ephemeral(fake_discord, await fake_discord.slash("history", bob))

    assert up.kind == "upscale" and up.parent_id == parent.id and up.parent_image_index == 1
    assert up.user_id == str(bob.id) and up_click.callbacks[0]["body"]["type"] == 5  # a new public message
    assert image_size(upscaled["_files"][0]) == (128, 128)
    assert "upscale" in upscaled["content"]
    # zoom out 2x of the 128x128 upscale: a 256x256 canvas whose border (only) was painted
    assert (zoom.kind, zoom.params.detail, image_size(zoomed["_files"][0])) == ("zoom", "2x", (256, 256))
    inpaint = next(c.params for c in backend.calls if c.params.task == "inpaint" and c.params.width == 256)
    mask = Image.open(io.BytesIO(inpaint.mask)).convert("L")
    assert ImageChops.invert(mask).getbbox() == (64, 64, 192, 192) and set(mask.getdata()) == {0, 255}
    assert (pan.kind, pan.params.detail, image_size(panned["_files"][0])) == ("pan", "left", (192, 128))
    assert (subtle.kind, subtle.params.detail, subtle.params.strength) == ("variation", "subtle", 0.3)
    assert bob_quota.used_today == 4  # charged to who clicked, one image each
    # each in the clicker's /history, saying what made it from what
    assert f"upscale of #{parent.id}" in history and f"zoom out 2x of #{up.id}" in history
    assert f"pan left of #{up.id}" in history and f"variation (subtle) of #{up.id}" in history


async def test_remix_dialog_and_cancel_button(fake_discord: FakeDiscord, tmp_path):
    alice, bob = fake_discord.user("alice"), fake_discord.user("bob")
    backend = FakeBackend()
    config = app_config(tmp_path, fake_discord, bot={"dispatch_concurrency": 1})
    async with App(fake_discord, config, backend=backend) as app:
        rec = await fake_discord.slash("imagine", alice, {"prompt": "a red kite --no clouds", "seed": 9})
        result = await wait_result(fake_discord, rec)
        parent = await result_job(app, result)

        # Remix: a dialog prefilled with the prompt and flags; the edit is submitted as a new job.
        opened = await fake_discord.click(result, f"imagine:remix:{parent.id}", alice)
        await fake_discord.wait_for(lambda: opened.modal is not None, what="the remix dialog")
        field = opened.modal["components"][0]["components"][0]
        submitted = await fake_discord.submit_modal(
            opened, {field["custom_id"]: "a blue kite --strength 0.5 --steps 4"}, alice
        )
        remixed = await wait_result(fake_discord, submitted)
        remix = await result_job(app, remixed)

        # Cancel: a job waiting behind a held one shows Cancel on its status; pressing it ends it.
        backend.hold()
        blocker = await fake_discord.slash("imagine", bob, {"prompt": "a slow one"})
        await fake_discord.wait_for(lambda: backend.in_flight == 1, what="the first job to start")
        waiting = await fake_discord.slash("imagine", bob, {"prompt": "never mind"})
        status = await fake_discord.wait_for(
            lambda: waiting.original if fake_discord.button_ids(waiting.original or {}) else None,
            what="a status with a Cancel button",
        )
        job_id = int(find(fake_discord.button_ids(status), "imagine:cancel:").rsplit(":", 1)[1])
        press = await fake_discord.click(status, f"imagine:cancel:{job_id}", bob)
        shown = await fake_discord.wait_for(
            lambda: (lambda m: m if "cancelled" in m["content"] else None)(
                fake_discord.messages[int(status["id"])]
            ),
            what="the status saying cancelled",
        )
        # Someone else's cancel is refused privately.
        blocker_status = fake_discord.messages[int(blocker.original["id"])]
        other = await fake_discord.click(
            blocker_status, find(fake_discord.button_ids(blocker_status), "imagine:cancel:"), alice
        )
        refusal = await wait_ephemeral(fake_discord, other)
        backend.release()
        await wait_result(fake_discord, blocker)
        await asyncio.sleep(0.3)
        cancelled = await app.service.get_job(job_id)
        quota = await app.service.quota(Actor("discord", str(bob.id)), place(fake_discord))

    assert field["value"] == "a red kite --steps 20 --guidance 7.5 --no clouds"  # prefilled
    assert (remix.kind, remix.prompt, remix.params.strength, remix.params.steps) == (
        "remix",
        "a blue kite",
        0.5,
        4,
    )
    assert remix.parent_id == parent.id and remix.negative_prompt == ""
    assert press.callbacks[0]["body"]["type"] == 6  # an update of the status message itself
    assert cancelled.state == "cancelled" and shown["components"] == []
    assert not fake_discord.messages[int(status["id"])]["attachments"]  # and no result came after it
    assert quota.used_today == 1  # the cancelled job was refunded
    assert "⛔" in refusal and "Traceback" not in refusal


async def test_buttons_work_after_a_restart(fake_discord: FakeDiscord, tmp_path):
    alice, bob = fake_discord.user("alice"), fake_discord.user("bob")
    config = app_config(tmp_path, fake_discord)
    async with App(fake_discord, config) as first:
        rec = await fake_discord.slash("imagine", alice, {"prompt": "a mill", "count": 2})
        grid = await wait_result(fake_discord, rec)
        parent = await result_job(first, grid)
    async with App(fake_discord, config) as second:
        click = await fake_discord.click(grid, f"imagine:var:{parent.id}:1", bob)
        variation = await result_job(second, await wait_result(fake_discord, click))
    assert (variation.kind, variation.parent_id, variation.parent_image_index) == ("variation", parent.id, 1)
