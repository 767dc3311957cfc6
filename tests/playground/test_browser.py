"""The playground in a real headless browser (Debian's chromium driven by Playwright), on the real
core (SQLite) with the in-process fake image backend, and on the Hugging Face backend against a
loopback fake of Hugging Face (the app this project grew from)."""

from __future__ import annotations

import io

from PIL import Image

from tests.backends.fake_hf import HF_TOKEN, fake_hugging_face, seed_colour
from tests.playground import flows
from tests.playground.harness import app_config, running_playground


async def test_type_a_prompt_get_images_then_reroll_and_vary(tmp_path, page):
    async with running_playground(app_config(tmp_path)) as app:
        await flows.open_playground(page, app.url)
        assert await page.locator("#reroll").is_disabled(), "nothing to re-roll yet"

        await flows.imagine(page, "/imagine a red fox in the snow --seed 42 --n 2", job_id=1)
        chat = page.locator("#chat")
        await chat.get_by_text("seed 42 · 64x64").wait_for()
        assert await flows.wait_chat_images(page, 2) == 2
        await page.locator("#quota").get_by_text("used 2 of 25 today").wait_for()
        assert (await page.locator("#quota").inner_text()).startswith("23 image(s) left")
        assert await page.locator("#v2").is_enabled() and await page.locator("#v3").is_disabled()

        await flows.click_and_wait(page, "#reroll", job_id=2)
        assert await flows.wait_chat_images(page, 4) == 4
        await flows.click_and_wait(page, "#v2", job_id=3)
        assert await flows.wait_chat_images(page, 6) == 6

        fox, reroll, variation = [await app.service.get_job(i) for i in (1, 2, 3)]
        assert (fox.platform, fox.user_id, fox.prompt, fox.params.seeds) == (
            "web",
            "local",
            "a red fox in the snow",
            (42, 43),
        )
        assert (reroll.kind, reroll.parent_id, reroll.prompt) == ("reroll", 1, fox.prompt)
        assert (variation.kind, variation.parent_id, variation.parent_image_index) == ("variation", 2, 1)
        assert all(j.state == "succeeded" for j in (fox, reroll, variation))

        await page.get_by_role("tab", name="History").click()
        await page.locator("#history-list").get_by_text("#3").wait_for()
        assert await page.locator("#history-gallery img").count() >= 6


async def test_zoom_out_and_upscale_from_the_buttons(tmp_path, page):
    async with running_playground(app_config(tmp_path)) as app:
        await flows.open_playground(page, app.url)
        await flows.imagine(page, "/imagine a tower on a hill --seed 3", job_id=1)
        # one image: the single-image operations are on, the per-image ones past it off
        assert await page.locator("#zoom-2").is_enabled() and await page.locator("#pan-left").is_enabled()
        assert await page.locator("#u1").is_enabled() and await page.locator("#u2").is_disabled()
        await flows.click_and_wait(page, "#zoom-2", job_id=2)
        await flows.click_and_wait(page, "#u1", job_id=3)
        assert await flows.wait_chat_images(page, 3) == 3
        sizes = await page.locator("#chat img").evaluate_all(
            "imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])"
        )
        zoom, upscale = await app.service.get_job(2), await app.service.get_job(3)
    # what the browser shows: the 64x64 original, its 2x zoom-out canvas, that canvas upscaled
    assert sizes == [[64, 64], [128, 128], [256, 256]], sizes
    assert (zoom.kind, zoom.parent_id, zoom.params.detail) == ("zoom", 1, "2x")
    assert (upscale.kind, upscale.parent_id) == ("upscale", 2)


async def test_the_original_app_a_prompt_typed_in_the_page_drawn_by_hugging_face(tmp_path, page):
    sdxl = "stabilityai/stable-diffusion-xl-base-1.0"
    backends = {"kind": "huggingface", "hf_provider": "hf-inference", "hf_model": sdxl}
    # The real backend and huggingface_hub client; only Hugging Face's servers are the loopback fake.
    async with fake_hugging_face() as hf:
        hf.serve(sdxl, "hf-inference")
        config = app_config(tmp_path, backends=backends)
        async with running_playground(config, {"HUGGING_FACE_API_KEY": HF_TOKEN}) as app:
            await flows.open_playground(page, app.url)
            await flows.imagine(page, "/imagine a lighthouse at dusk --seed 42 --no fog", job_id=1)
            assert await flows.wait_chat_images(page, 1) == 1
            # The pixels the browser shows are the ones Hugging Face sent for seed 42 (JPEG: near).
            shown = await page.locator("#chat img").first.evaluate(
                """img => { const c = document.createElement('canvas');
                c.width = img.naturalWidth; c.height = img.naturalHeight;
                const g = c.getContext('2d'); g.drawImage(img, 0, 0);
                return [c.width, c.height, ...g.getImageData(5, 5, 1, 1).data.slice(0, 3)]; }"""
            )
            assert shown[:2] == [64, 64]
            assert all(abs(a - b) <= 4 for a, b in zip(shown[2:], seed_colour(42), strict=True)), shown
            [seen] = hf.seen
            assert (seen.provider, seen.path) == ("hf-inference", f"/hf-inference/models/{sdxl}")
            assert seen.body == {
                "inputs": "a lighthouse at dusk",
                "parameters": {
                    "negative_prompt": "fog",
                    "height": 64,
                    "width": 64,
                    "num_inference_steps": 4,
                    "guidance_scale": 7.5,
                    "seed": 42,
                },
            }
            # hf-inference serves this model for text-to-image only: a variation is refused, in words.
            await page.locator("#v1").click()
            failed = page.locator('#status [data-job="2"][data-state="failed"]')
            await failed.wait_for()
            said = await failed.inner_text()
            assert "refused this job: variations (image-to-image) are not available here" in said
            assert "Your quota was refunded" in said
            assert len(hf.seen) == 1 and (await app.service.get_job(1)).state == "succeeded"


async def test_inpaint_with_a_mask_drawn_with_the_brush(tmp_path, page):
    async with running_playground(app_config(tmp_path)) as app:
        await flows.open_playground(page, app.url)
        photo = flows.sample_photo(tmp_path / "photo.png")
        await flows.inpaint(page, photo, "a sailing boat", job_id=1)
        assert await page.locator("#inpaint-result img").count() >= 1

        job = await app.service.get_job(1)
        assert (job.kind, job.prompt, job.state) == ("inpaint", "a sailing boat", "succeeded")
        [call] = app.core.backend.calls
        assert call.params.task == "inpaint"
        image = Image.open(io.BytesIO(call.params.image)).convert("RGB")
        mask = Image.open(io.BytesIO(call.params.mask)).convert("L")
        assert image.size == mask.size == (64, 64)
        original = Image.open(photo).convert("RGB")
        kept = [(x, y) for x in range(64) for y in range(64) if mask.getpixel((x, y)) < 128]
        drift = max(
            abs(a - b) for p in kept for a, b in zip(image.getpixel(p), original.getpixel(p), strict=True)
        )
        # The editor re-draws the upload on a canvas: colours may move by a level or two, no more.
        assert kept and drift <= 4, (
            f"outside the mask the image sent is the upload, not paint (drift {drift})"
        )
        painted = sum(1 for x in range(64) for y in range(64) if mask.getpixel((x, y)) > 127)
        assert 0 < painted < 64 * 64, "the brush stroke is white in the mask and the rest black"
        assert mask.getpixel((32, 32)) > 127, "the stroke crosses the middle"


async def test_admin_change_shows_in_the_quota_and_applies(tmp_path, page):
    async with running_playground(app_config(tmp_path)) as app:
        await flows.open_playground(page, app.url)
        assert "of 25 today" in await page.locator("#quota").inner_text()
        await flows.set_my_daily_limit(page, 3)
        await page.locator("#quota").get_by_text("of 3 today").wait_for()
        assert "your own limit" in await page.locator("#quota").inner_text()

        await page.get_by_role("tab", name="Imagine").click()
        await page.locator("#prompt textarea").fill("/imagine four kites --n 4")
        await page.locator("#send").click()
        await page.locator("#chat").get_by_text("Daily limit reached").wait_for()
        assert await app.service.history(_local(), limit=5) == []


def _local():
    from bot.core.api import Actor

    return Actor("web", "local", is_admin=True)
