"""What a person does in the playground, as Playwright steps (used by the browser tests and by
`python -m tests.playground.screenshots`)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw


async def open_playground(page, url: str) -> None:
    await page.goto(url)
    # The page is ready when its load event has filled in the quota line.
    await page.locator("#quota").get_by_text("image(s) left").wait_for()


async def imagine(page, text: str, job_id: int) -> None:
    """Type a command in the chat, send it, and wait until job `job_id` is shown done."""
    await page.locator("#prompt textarea").fill(text)
    await page.locator("#send").click()
    await page.locator(f'#status [data-job="{job_id}"][data-state="succeeded"]').wait_for()


async def click_and_wait(page, button: str, job_id: int) -> None:
    await page.locator(button).click()
    await page.locator(f'#status [data-job="{job_id}"][data-state="succeeded"]').wait_for()


async def wait_chat_images(page, count: int) -> int:
    """Wait until the chat shows `count` images the browser actually fetched and decoded; returns
    how many there are then (more would be a bug the caller's assert catches)."""
    js = "imgs => imgs.filter(i => i.complete && i.naturalWidth > 0).length"
    await page.wait_for_function(
        f"() => Array.from(document.querySelectorAll('#chat img')).filter(i => i.complete && i.naturalWidth > 0).length >= {count}"
    )
    return await page.locator("#chat img").evaluate_all(js)


def sample_photo(path: Path, size: int = 64) -> Path:
    """A little "photo" to inpaint: sky, sea and a sun."""
    img = Image.new("RGB", (size, size), (90, 160, 230))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, size * 2 // 3, size, size), fill=(20, 70, 140))
    draw.ellipse((size // 8, size // 8, size // 3, size // 3), fill=(250, 210, 60))
    img.save(path)
    return path


async def inpaint(page, image: Path, prompt: str, job_id: int) -> None:
    """Upload `image` (small: shown zoomed in), paint a stroke across its middle with the brush,
    and inpaint."""
    from playwright.async_api import TimeoutError as PlaywrightTimeoutError

    await page.get_by_role("tab", name="Inpaint").click()
    # Once in a full-suite run on the loaded 2-core machine the editor never showed an upload made
    # right after the tab switch (30 s wait); alone it always does. A person would pick the file
    # again, and so does the test, at most three times.
    for attempt in range(3):
        # As a person does it: click the drop zone and pick the file.
        async with page.expect_file_chooser() as chooser:
            await page.locator('#editor [aria-label="Click to upload or drop files"]').click()
        await (await chooser.value).set_files(str(image))
        # Wait until the editor shows the upload: it then zooms in to fit the small image. Painting
        # before that would paint on a blank canvas of its own.
        try:
            await page.wait_for_function(
                "() => { const m = document.querySelector('#editor').innerText.match(/(\\d+)%/);"
                " return m !== null && Number(m[1]) > 100; }",
                timeout=15_000,
            )
            break
        except PlaywrightTimeoutError:
            if attempt == 2:
                raise
    await page.get_by_role("button", name="Brush", exact=True).click()
    box = await page.locator("#editor").bounding_box()
    assert box is not None
    # The uploaded image is centred in the editor; the stroke stays inside it.
    x0, y0 = box["x"] + box["width"] / 2 - 60, box["y"] + box["height"] / 2 - 20
    await page.mouse.move(x0, y0)
    await page.mouse.down()
    # Few pointer moves: the editor re-renders on each, slowly on a software-rendered canvas.
    for i in range(1, 4):
        await page.mouse.move(x0 + i * 40, y0 + i * 10)
    await page.mouse.up()
    await page.locator("#inpaint-prompt textarea").fill(prompt)
    await page.locator("#inpaint-send").click()
    await page.locator(f'#inpaint-status [data-job="{job_id}"][data-state="succeeded"]').wait_for()


async def set_my_daily_limit(page, limit: int) -> None:
    await page.get_by_role("tab", name="Admin").click()
    await page.locator("#admin-number input").fill(str(limit))
    await page.locator("#admin-set-limit").click()
    await page.locator("#admin-result").get_by_text(f"set to {limit} per day").wait_for()
