"""Screenshots of the playground for the README: `python -m tests.playground.screenshots [--out DIR]`.

Runs the real core and playground in this process (SQLite in a temporary folder) and drives them
with the system's chromium. The images come from the in-process fake backend unless `--server URL`
points at a running inference server (its token in INFERENCE_API_TOKEN), e.g. one serving the
embedded model. Writes chat.png, inpaint.png and admin.png, reduced to 256 colours to stay small.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from pathlib import Path

from PIL import Image

from tests.playground import flows
from tests.playground.harness import CHROMIUM, CHROMIUM_ARGS, app_config, running_playground

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "bot" / "playground" / "screenshots"


def shrink(path: Path) -> None:
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)


async def take(out: Path, server: str | None) -> list[Path]:
    from playwright.async_api import async_playwright

    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - a script, nothing else runs yet
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        backends = (
            {"kind": "inference_server", "urls": [server]}
            if server
            else {"kind": "fake", "fake_delay_s": 0.5}
        )
        config = app_config(tmp, backends=backends, bot={"default_steps": 20})
        env = {"INFERENCE_API_TOKEN": os.environ.get("INFERENCE_API_TOKEN", "")} if server else {}
        async with running_playground(config, env) as app, async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = await browser.new_page(viewport={"width": 1200, "height": 860})
            page.set_default_timeout(120_000)
            await flows.open_playground(page, app.url)
            await flows.imagine(
                page, "/imagine a yellow triangle on a purple background --n 4 --seed 7", job_id=1
            )
            await flows.wait_chat_images(page, 4)
            await flows.click_and_wait(page, "#v3", job_id=2)
            await flows.wait_chat_images(page, 8)
            shots = [out / "chat.png"]
            await page.screenshot(path=shots[0])
            await flows.inpaint(
                page, flows.sample_photo(tmp / "photo.png"), "a red circle on a blue background", job_id=3
            )
            shots.append(out / "inpaint.png")
            await page.screenshot(path=shots[1])
            await flows.set_my_daily_limit(page, 50)
            await page.locator("#admin-stats").click()
            await page.locator("#admin-result").get_by_text("Images today").wait_for()
            shots.append(out / "admin.png")
            await page.screenshot(path=shots[2])
            await browser.close()
    for shot in shots:
        shrink(shot)
    return shots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--server", help="inference server URL (default: the in-process fake backend)")
    args = parser.parse_args()
    for shot in asyncio.run(take(args.out, args.server)):
        print(f"{shot} ({shot.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
