"""/inpaint: attachments downloaded for real from the fake's HTTP server, and every bad case refused."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from tests.discord.fake_discord import FakeDiscord
from tests.discord.harness import App, app_config, image_size, result_job, wait_ephemeral, wait_result


def png(size=(64, 64), mode="RGB", colour=(200, 30, 30), transparent_box=None) -> bytes:
    img = Image.new(mode, size, colour if mode != "RGBA" else (*colour, 255))
    if transparent_box is not None:
        img.paste((0, 0, 0, 0), transparent_box)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def mask_png(size=(64, 64)) -> bytes:
    img = Image.new("L", size, 0)
    img.paste(255, (16, 16, 48, 48))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


async def test_inpaint_with_mask(fake_discord: FakeDiscord, tmp_path):
    user = fake_discord.user("painter")
    image = fake_discord.add_attachment("photo.png", png(), "image/png", width=64, height=64)
    mask = fake_discord.add_attachment("mask.png", mask_png(), "image/png", width=64, height=64)
    async with App(fake_discord, app_config(tmp_path, fake_discord)) as app:
        rec = await fake_discord.slash(
            "inpaint", user, {"prompt": "a blue window"}, attachments={"image": image, "mask": mask}
        )
        result = await wait_result(fake_discord, rec)
        job = await result_job(app, result)
        await fake_discord.wait_for(
            lambda: fake_discord.button_ids(fake_discord.messages[int(result["id"])]), what="buttons"
        )
    assert rec.callbacks[0]["body"]["type"] == 5  # deferred before downloading anything
    assert sorted(k.split("/")[-1] for k in fake_discord.downloads) == ["mask.png", "photo.png"]
    assert job.kind == "inpaint" and job.state == "succeeded"
    assert "a blue window" in result["content"] and "inpaint" in result["content"]
    assert image_size(result["_files"][0]) == (64, 64)
    assert fake_discord.reactions_on(int(result["id"])) == []  # no hint reactions: buttons
    assert len(fake_discord.button_ids(fake_discord.messages[int(result["id"])])) == 3  # one image: 3 rows
    sent = app.backend.succeeded[-1]
    assert sent.task == "inpaint" and sent.mask is not None


async def test_inpaint_transparent_image_needs_no_mask(fake_discord: FakeDiscord, tmp_path):
    user = fake_discord.user("painter")
    data = png(mode="RGBA", transparent_box=(0, 0, 32, 64))
    image = fake_discord.add_attachment("cutout.png", data, "image/png", width=64, height=64)
    async with App(fake_discord, app_config(tmp_path, fake_discord)) as app:
        rec = await fake_discord.slash("inpaint", user, {"prompt": "a garden"}, attachments={"image": image})
        result = await wait_result(fake_discord, rec)
        job = await result_job(app, result)
    assert job.kind == "inpaint" and job.state == "succeeded"
    mask = Image.open(io.BytesIO(app.backend.succeeded[-1].mask)).convert("L")
    assert mask.getpixel((4, 32)) == 255 and mask.getpixel((60, 32)) == 0  # transparent half repainted


BAD = {
    "not an image": (("notes.txt", b"hello", "text/plain"), None, "not a PNG, JPEG or WebP image"),
    "too large": (("huge.png", png(), "image/png", 50 * 1024 * 1024), None, "limit"),
    "corrupt": (("broken.png", b"\x89PNG not really", "image/png"), None, "not a readable"),
    "size mismatch": (
        ("photo.png", png(), "image/png"),
        ("mask.png", mask_png((32, 32)), "image/png"),
        "same size",
    ),
    "no mask, no transparency": (("photo.png", png(), "image/png"), None, "transparen"),
    "mask not an image": (
        ("photo.png", png(), "image/png"),
        ("mask.pdf", b"%PDF-1.4", "application/pdf"),
        "mask",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
async def test_bad_attachments_get_a_clear_private_error(fake_discord: FakeDiscord, tmp_path, case):
    image_spec, mask_spec, expected = BAD[case]
    user = fake_discord.user("painter")

    def attach(spec):
        name, data, ctype, *size = spec
        return fake_discord.add_attachment(name, data, ctype, size=size[0] if size else None)

    attachments = {"image": attach(image_spec)}
    if mask_spec is not None:
        attachments["mask"] = attach(mask_spec)
    async with App(fake_discord, app_config(tmp_path, fake_discord)) as app:
        rec = await fake_discord.slash("inpaint", user, {"prompt": "anything"}, attachments=attachments)
        text = await wait_ephemeral(fake_discord, rec)
        from bot.core.api import Actor

        history = await app.service.history(Actor("discord", str(user.id)), 5)
    assert expected in text, text
    assert "Traceback" not in text and len(text) < 300
    assert rec.deleted_original  # no public "thinking…" left behind
    assert history == []
    if case in ("not an image", "too large"):
        assert fake_discord.downloads == []  # refused from the metadata, nothing downloaded


async def test_imagine_from_an_attached_image(fake_discord: FakeDiscord, tmp_path):
    """/imagine with `image`: image-to-image at `strength`; the size follows the image (3:2 here)."""
    user = fake_discord.user("painter")
    photo = fake_discord.add_attachment("photo.png", png((300, 200)), "image/png", width=300, height=200)
    async with App(fake_discord, app_config(tmp_path, fake_discord)) as app:
        rec = await fake_discord.slash(
            "imagine", user, {"prompt": "an oil painting", "strength": 0.35}, attachments={"image": photo}
        )
        result = await wait_result(fake_discord, rec)
        job = await result_job(app, result)
        # --strength without an image is refused by name
        bare = await fake_discord.slash("imagine", user, {"prompt": "a cat --strength 0.5"})
        refusal = await wait_ephemeral(fake_discord, bare)
    sync = {c["name"]: c for c in fake_discord.command_syncs[-1]["payload"]}["imagine"]
    opts = {o["name"]: o["type"] for o in sync["options"]}
    assert opts["image"] == 11 and opts["strength"] == 10
    assert (job.kind, job.params.task, job.params.strength) == ("imagine", "img2img", 0.35)
    assert image_size(result["_files"][0]) == (80, 56)
    assert "image to image" in result["content"] and "strength 0.35" in result["content"]
    sent = app.backend.succeeded[-1]
    assert sent.task == "img2img" and image_size(sent.image) == (80, 56)
    assert "--strength only applies when you start from an image" in refusal
