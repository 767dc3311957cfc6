"""Models and LoRAs in the playground: the Model list writes `--model` into the prompt box, /models
and /help list them, and a job's model and LoRAs reach the backend (over Gradio's own client)."""

from __future__ import annotations

import asyncio
from typing import Any

from bot.backends.base import LoraSpec
from bot.core.api import Place
from bot.core.model_choice import ModelCatalog
from bot.playground.ui import model_choices, with_model_flag
from tests.core.test_models import SD15, SDXL
from tests.playground.harness import app_config, running_playground
from tests.playground.test_http import chat_texts, client


def test_the_model_list_writes_the_model_flag() -> None:
    assert with_model_flag("a fox --seed 3", "sdxl-base") == "a fox --seed 3 --model sdxl-base"
    assert with_model_flag("a fox --model sd15-base --n 2", "sdxl-base") == "a fox --n 2 --model sdxl-base"
    # before --no, which takes the rest of the text
    assert with_model_flag("a fox --no rain, fog", "sdxl-base") == "a fox --model sdxl-base --no rain, fog"
    assert with_model_flag("a fox \u2014model old", None) == "a fox"
    assert with_model_flag("", "sdxl-base") == "--model sdxl-base"


def offer_models(app: Any) -> None:
    app.core.backend.models_offered = [SD15, SDXL]
    app.core.service.catalog = ModelCatalog([SD15, SDXL])


async def test_models_listing_and_a_job_on_a_model(tmp_path) -> None:
    async with running_playground(app_config(tmp_path)) as app:
        offer_models(app)
        listing = await app.service.models(Place("web"))
        assert model_choices(listing) == [
            ("sd15-base (Stable Diffusion 1.5, default)", "sd15-base"),
            ("sdxl-base (SDXL)", "sdxl-base"),
        ]

        def go() -> tuple[list[str], list[str]]:
            c = client(app.url)
            try:
                models = chat_texts(c.predict("/models", api_name="/imagine"))
                c.predict("/imagine a kite --seed 1 --model sdxl-base --lora detail:0.5", api_name="/imagine")
                helped = chat_texts(c.predict("/help", api_name="/imagine"))
                return models, helped
            finally:
                c.close()

        models, helped = await asyncio.to_thread(go)
        assert "- **sdxl-base** — SDXL, loads on first use; LoRAs: detail, pixel-art" in models[-1]
        assert "**Models**: sd15-base (default), sdxl-base." in helped[-1]
        job = await app.service.get_job(1)
        assert job.state == "succeeded" and (job.params.model, job.params.loras) == (
            "sdxl-base",
            (LoraSpec("detail", 0.5),),
        )
        assert app.core.backend.succeeded[-1].model == "sdxl-base"


async def test_the_model_list_in_the_browser(tmp_path, page) -> None:
    from tests.playground import flows

    async with running_playground(app_config(tmp_path)) as app:
        offer_models(app)
        await flows.open_playground(page, app.url)
        await page.locator("#prompt textarea").fill("a kite --seed 2 --no fog")
        await page.locator("#model input").click()
        await page.get_by_role("option", name="sdxl-base (SDXL)").click()
        await page.wait_for_function(
            "() => document.querySelector('#prompt textarea').value === 'a kite --seed 2 --model sdxl-base --no fog'"
        )
        await page.locator("#send").click()
        await page.locator('#status [data-job="1"][data-state="succeeded"]').wait_for()
        assert (await app.service.get_job(1)).params.model == "sdxl-base"
        await page.get_by_role("button", name="Models and LoRAs").click()
        await page.locator("#models").get_by_text("pixel-art").wait_for()
