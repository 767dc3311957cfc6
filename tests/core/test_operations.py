"""The operations on a result (upscale, vary strong/subtle, zoom out, pan, remix), image-to-image from
an upload, and cancel of a running job, on a real database with the fake backend: each is a job with
a parent, charged by what it makes, shown in the history, and the backend gets plain img2img /
inpaint requests of the right geometry."""

from __future__ import annotations

import asyncio
import datetime as dt
import io

import pytest
from PIL import Image, ImageChops

from bot.backends.fake import FakeBackend
from bot.core import controls, imageops
from bot.core.api import BadParameters, JobParams, JobView, Moderated, NotFound
from bot.core.operations import remix_text
from tests.core.helpers import ALICE, BOB, GUILD, running_core


def png(size: tuple[int, int], colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    img = Image.new("RGB", size, colour)
    img.putpixel((0, 0), (0, 0, 0))  # a corner that shows where the original went
    img.save(out, format="PNG")
    return out.getvalue()


def image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def black_box(mask_png: bytes) -> tuple[int, int, int, int] | None:
    """The box of the mask's black (kept) pixels; every other pixel must be white (repainted)."""
    mask = image(mask_png).convert("L")
    assert set(mask.getdata()) <= {0, 255}, "a mask is black and white only"
    return ImageChops.invert(mask).getbbox()


# -- geometry (pure functions) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factor", "size", "box"), [(2.0, (128, 128), (32, 32, 96, 96)), (1.5, (96, 96), (16, 16, 80, 80))]
)
def test_zoom_out_pads_by_the_factor_and_masks_exactly_the_border(factor, size, box):
    canvas = imageops.zoom_out(png((64, 64)), factor, max_side=1024)
    assert (canvas.width, canvas.height) == size == image(canvas.image_png).size
    assert black_box(canvas.mask_png) == box == canvas.original_box
    # the original sits unchanged in the kept box
    kept = image(canvas.image_png).crop(box)
    assert kept.getpixel((0, 0)) == (0, 0, 0) and kept.getpixel((5, 5)) == (200, 30, 30)


def test_zoom_out_past_the_largest_side_scales_the_canvas_and_redraws_the_mask():
    canvas = imageops.zoom_out(png((64, 64)), 2.0, max_side=64)
    assert (canvas.width, canvas.height) == (64, 64)
    assert black_box(canvas.mask_png) == (16, 16, 48, 48)


@pytest.mark.parametrize(
    ("direction", "size", "box"),
    [
        ("left", (96, 64), (32, 0, 96, 64)),
        ("right", (96, 64), (0, 0, 64, 64)),
        ("up", (64, 96), (0, 32, 64, 96)),
        ("down", (64, 96), (0, 0, 64, 64)),
    ],
)
def test_pan_extends_one_side_and_masks_only_the_new_strip(direction, size, box):
    canvas = imageops.pan(png((64, 64)), direction, max_side=1024)
    assert (canvas.width, canvas.height) == size
    assert black_box(canvas.mask_png) == box


def test_pan_refuses_past_4_to_1_and_upscale_past_its_limit():
    with pytest.raises(BadParameters, match="more than 4 times") as e:
        imageops.pan(png((256, 64)), "left", max_side=1024)
    assert e.value.field == "direction"
    with pytest.raises(BadParameters, match="largest upscale here is 128") as e:
        imageops.upscale_input(png((96, 96)), max_upscale_side=128)
    assert e.value.field == "image"


def test_canvases_and_tiles_keep_the_models_size_multiple():
    """SD 3.x and FLUX.1 take sides in multiples of 16: zoom-out, pan and upscale canvases and the
    tiles of a large upscale are laid out in the model's multiple, not a fixed 8."""
    source = png((48, 80))
    for canvas in (
        imageops.zoom_out(source, 1.5, max_side=1024, multiple=16),
        imageops.pan(source, "left", max_side=1024, multiple=16),
        imageops.pan(source, "up", max_side=1024, multiple=16),
        imageops.zoom_out(png((200, 136)), 2.0, max_side=256, multiple=16),
        imageops.upscale_input(png((40, 56)), max_upscale_side=1024, multiple=16),
    ):
        assert canvas.width % 16 == 0 and canvas.height % 16 == 0, (canvas.width, canvas.height)
        assert image(canvas.image_png).size == (canvas.width, canvas.height)
    for x0, y0, x1, y1 in imageops.tile_boxes(2048, 1200, 1024, 16):
        assert all(v % 16 == 0 for v in (x0, y0, x1, y1)) and x1 - x0 <= 1024 and y1 - y0 <= 1024


def test_tiles_cover_the_image_with_overlaps_and_blend_without_seams():
    boxes = imageops.tile_boxes(2048, 1024, 1024)
    assert all(x1 - x0 <= 1024 and y1 - y0 <= 1024 and x0 % 8 == 0 for x0, y0, x1, y1 in boxes)
    assert boxes[0][:2] == (0, 0) and max(b[2] for b in boxes) == 2048 and max(b[3] for b in boxes) == 1024
    xs = sorted({(b[0], b[2]) for b in boxes})
    assert all(a[1] > b[0] for a, b in zip(xs, xs[1:], strict=False)), "neighbours overlap"
    # tiles cut from one picture blend back into that picture
    source = Image.linear_gradient("L").resize((128, 96)).convert("RGB")
    data = io.BytesIO()
    source.save(data, format="PNG")
    tiles = [(b, imageops.crop(data.getvalue(), b)) for b in imageops.tile_boxes(128, 96, 64)]
    assert len(tiles) > 1
    blended = image(imageops.blend_tiles(128, 96, tiles))
    diff = ImageChops.difference(blended, source).getextrema()
    assert max(hi for _lo, hi in diff) <= 1


def job_view_with(n: int) -> JobView:
    params = JobParams(64, 64, 20, 7.5, n, 1, tuple(range(1, n + 1)))
    return JobView(
        1, "imagine", "succeeded", "discord", "u", "U", None, None, "p", "", params,
        None, None, None, dt.datetime.now(dt.UTC), None, None, None, {},
    )  # fmt: skip


def test_result_controls_fit_discord_and_round_trip_their_ids():
    for n in (1, 2, 4):
        rows = controls.result_controls(job_view_with(n))
        assert len(rows) <= 5 and all(len(row) <= 5 for row in rows)
        for row in rows:
            for control in row:
                cid = control.id_for(2**62)
                assert len(cid) <= 100
                assert controls.parse(cid) == controls.Pressed(control.op, 2**62, control.arg)
    assert controls.parse("imagine:rm:1") is None and controls.parse("other:up:1:0") is None


# -- end to end on the database -----------------------------------------------------------------


async def first_result(core, text="a red barn --seed 5"):
    job = await core.service.imagine(ALICE, GUILD, text, idempotency_key=f"k-{abs(hash(text))}")
    done = await core.service.wait_for_job(job.id, 30)
    assert done.state == "succeeded"
    return done


async def test_upscale_vary_zoom_pan_and_remix_are_jobs_with_a_parent(db_url, tmp_path):
    backend = FakeBackend()
    async with running_core(db_url, tmp_path, backend=backend) as (core, delivery):
        parent = await first_result(core)
        s = core.service
        # Bob uses Alice's result as a button would: by the job id and the message it sits on, in
        # the channel that shows it (by the job id alone it is hers and an admin's only).
        await s.attach_result_message(parent.id, "m1", GUILD.channel_id)
        ref = {"job_id": parent.id, "message_id": "m1"}
        with pytest.raises(NotFound):
            await s.upscale(BOB, GUILD, 0, job_id=parent.id, idempotency_key="u0")
        up = await s.upscale(BOB, GUILD, 0, **ref, idempotency_key="u")
        subtle = await s.variation(BOB, GUILD, 0, **ref, subtle=True, idempotency_key="vs")
        zoom = await s.zoom_out(BOB, GUILD, 2, **ref, idempotency_key="z")
        pan = await s.pan(BOB, GUILD, "right", **ref, idempotency_key="p")
        remix = await s.remix(BOB, GUILD, "a blue barn --strength 0.8 --steps 7", **ref, idempotency_key="r")
        done = {j.id: await s.wait_for_job(j.id, 30) for j in (up, subtle, zoom, pan, remix)}
        # the same key again is the same job, charged once
        assert (await s.upscale(BOB, GUILD, 0, **ref, idempotency_key="u")).id == up.id
        quota = await s.quota(BOB, GUILD)
        history = await s.history(BOB)
    assert all(j.state == "succeeded" and j.parent_id == parent.id for j in done.values())
    assert quota.used_today == 5  # one image each
    assert {j.id for j in history} == set(done)
    by_kind = {j.kind: j for j in done.values()}
    assert by_kind["upscale"].params.detail == "2x" and by_kind["upscale"].params.strength == 0.3
    assert (by_kind["upscale"].images[0].width, by_kind["upscale"].images[0].height) == (128, 128)
    assert by_kind["upscale"].params.seed == parent.params.seed  # the upscaled image's own seed
    assert subtle.params.detail == "subtle" and subtle.params.strength == 0.3
    assert (by_kind["zoom"].images[0].width, by_kind["pan"].images[0].width) == (128, 96)
    assert by_kind["zoom"].params.task == by_kind["pan"].params.task == "inpaint"
    assert remix.kind == "remix" and remix.prompt == "a blue barn" and remix.params.strength == 0.8
    assert remix.params.steps == 7 and remix.params.task == "img2img"
    calls = {c.params.task: c.params for c in backend.calls[1:]}
    assert set(calls) == {"img2img", "inpaint"}
    # what the backend got: plain requests; the zoom's kept centre is the parent image itself
    zoom_call = next(c.params for c in backend.calls if c.params.task == "inpaint" and c.params.width == 128)
    assert black_box(zoom_call.mask) == (32, 32, 96, 96)
    parent_png = await core.storage.get(parent.images[0].storage_key)
    zoom_png = await core.storage.get(by_kind["zoom"].images[0].storage_key)
    centre = image(zoom_png).convert("RGB").crop((32, 32, 96, 96))
    assert ImageChops.difference(centre, image(parent_png).convert("RGB")).getbbox() is None


async def test_refusals_name_what_is_wrong(db_url, tmp_path):
    async with running_core(db_url, tmp_path, moderation={"banned_terms": ["gore"]}) as (core, _):
        parent = await first_result(core)
        s = core.service
        with pytest.raises(Moderated):
            await s.remix(ALICE, GUILD, "gore everywhere", job_id=parent.id, idempotency_key="r1")
        with pytest.raises(BadParameters, match="--ar does not apply in a remix"):
            await s.remix(ALICE, GUILD, "a barn --ar 3:2", job_id=parent.id, idempotency_key="r2")
        with pytest.raises(BadParameters, match="Zoom out by 1.5x or 2x"):
            await s.zoom_out(ALICE, GUILD, 3, job_id=parent.id, idempotency_key="z")
        with pytest.raises(BadParameters, match="Pan left, right, up or down"):
            await s.pan(ALICE, GUILD, "sideways", job_id=parent.id, idempotency_key="p")
        with pytest.raises(BadParameters, match="Image 2 does not exist"):
            await s.upscale(ALICE, GUILD, 1, job_id=parent.id, idempotency_key="u")
        with pytest.raises(BadParameters, match="--strength only applies when you start from an image"):
            await s.imagine(ALICE, GUILD, "a barn --strength 0.5", idempotency_key="i")
        with pytest.raises(BadParameters, match="--strength must be from 0 to 1"):
            await s.image_to_image(ALICE, GUILD, "a barn --strength 2", png((64, 64)), idempotency_key="i2")
        q = await s.quota(ALICE, GUILD)
    assert q.used_today == 1  # refusals cost nothing


async def test_image_to_image_from_an_upload(db_url, tmp_path):
    backend = FakeBackend()
    async with running_core(db_url, tmp_path, backend=backend) as (core, _):
        job = await core.service.image_to_image(
            ALICE, GUILD, "a watercolour --strength 0.45 --seed 3", png((300, 200)), idempotency_key="up"
        )
        done = await core.service.wait_for_job(job.id, 30)
        default = await core.service.image_to_image(
            ALICE, GUILD, "a sketch", png((64, 64)), idempotency_key="d"
        )
        default = await core.service.wait_for_job(default.id, 30)
    assert done.kind == "imagine" and done.params.task == "img2img" and done.params.strength == 0.45
    assert (done.params.width, done.params.height) == (80, 56)  # the upload's 3:2 at ~64x64 pixels
    assert backend.calls[0].params.image is not None and image(backend.calls[0].params.image).size == (80, 56)
    assert default.params.strength == 0.6  # [bot] image_strength
    assert remix_text(done) == "a watercolour --steps 20 --guidance 7.5"


async def test_a_tiled_upscale_past_the_largest_side(sqlite_url, tmp_path):
    backend = FakeBackend()
    async with running_core(sqlite_url, tmp_path, backend=backend, bot={"max_side": 64}) as (core, delivery):
        parent = await first_result(core, "a lighthouse --seed 9 --steps 4")
        up = await core.service.upscale(ALICE, GUILD, 0, job_id=parent.id, idempotency_key="u")
        done = await core.service.wait_for_job(up.id, 30)
        await delivery.wait_for(lambda: up.id in delivery.succeeded)
    tiles = [c.params for c in backend.calls[1:]]
    assert len(tiles) == len(imageops.tile_boxes(128, 128, 64)) > 1
    assert all(t.task == "img2img" and max(t.width, t.height) <= 64 for t in tiles)
    assert (done.images[0].width, done.images[0].height) == (128, 128)
    steps = [e[2:] for e in delivery.events if e[0] == "progress" and e[1] == up.id]
    assert steps[-1] == (4 * len(tiles), 4 * len(tiles))  # progress counts every tile's steps


async def test_cancel_stops_a_running_job_and_refunds_it(db_url, tmp_path):
    backend = FakeBackend()
    async with running_core(db_url, tmp_path, backend=backend) as (core, delivery):
        backend.hold()
        job = await core.service.imagine(ALICE, GUILD, "a slow one --n 2", idempotency_key="c")
        await delivery.wait_for(lambda: any(e[:2] == ("progress", job.id) for e in delivery.events))
        cancelled = await core.service.cancel(ALICE, job.id, GUILD)
        async with asyncio.timeout(60):  # only bounds a failure: a loaded CI machine is slow
            while not (backend.calls and backend.calls[0].outcome == "cancelled"):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        backend.release()
        quota = await core.service.quota(ALICE, GUILD)
        await asyncio.sleep(0.3)
        final = await core.service.get_job(job.id)
    assert cancelled.state == "cancelled" and final.state == "cancelled"
    assert backend.calls[0].outcome == "cancelled"  # the run was stopped, not left to finish
    assert quota.used_today == 0 and job.id not in delivery.succeeded and job.id not in delivery.failed


async def test_a_slow_delivery_holds_no_dispatch_slot(sqlite_url, tmp_path):
    backend = FakeBackend()
    async with running_core(sqlite_url, tmp_path, backend=backend, bot={"dispatch_concurrency": 1}) as (
        core,
        delivery,
    ):
        stuck = asyncio.Event()
        first_delivery = asyncio.Event()
        plain = delivery.on_succeeded

        async def slow(job, images):
            if not first_delivery.is_set():
                first_delivery.set()
                await stuck.wait()  # a platform outage on the first result
            await plain(job, images)

        delivery.on_succeeded = slow  # type: ignore[method-assign]
        a = await core.service.imagine(ALICE, GUILD, "first", idempotency_key="a")
        await asyncio.wait_for(first_delivery.wait(), 60)
        b = await core.service.imagine(ALICE, GUILD, "second", idempotency_key="b")
        await delivery.wait_for(lambda: b.id in delivery.succeeded, within_s=60)
        stuck.set()
        await delivery.wait_for(lambda: a.id in delivery.succeeded, within_s=60)
    assert len(backend.calls) == 2
