"""Models and LoRAs on Slack: `/imagine models`, the models in `/imagine help`, `--model`/`--lora`
flags reaching the backend, and the workspace admins' default model and allow-lists."""

from __future__ import annotations

import pytest

from bot.backends.base import LoraSpec
from bot.core.model_choice import ModelCatalog
from tests.core.test_models import SD15, SDXL
from tests.slack.harness import ADMIN_ID, Running, result_messages

pytestmark = pytest.mark.timeout(120)


def offer_models(slack: Running) -> None:
    """The servers of this run offer two models (the fake backend checks jobs against them)."""
    slack.core.backend.models_offered = [SD15, SDXL]
    slack.core.service.catalog = ModelCatalog([SD15, SDXL])


async def answer(slack: Running, command: str, text: str, user: str = "UALICE01") -> str:
    before = len(slack.fake.responses)
    reply, _ = await slack.sender.slash_command(command, text, user_id=user)
    assert reply.status == 200, reply.body
    await slack.fake.wait_for(lambda: len(slack.fake.responses) > before)
    return slack.fake.responses[-1]["text"]


async def test_models_listing_help_and_flags(slack: Running):
    assert "one model and no LoRAs" in await answer(slack, "/imagine", "models")
    offer_models(slack)
    listing = await answer(slack, "/imagine", "models")
    assert listing.splitlines()[:3] == [
        "*Models you can use here*",
        "• *sd15-base* — Stable Diffusion 1.5, default here; LoRAs: ink, detail",
        "• *sdxl-base* — SDXL, loads on first use; LoRAs: detail, pixel-art",
    ]
    assert "Models: sd15-base (default), sdxl-base." in await answer(slack, "/imagine", "help")

    await slack.sender.slash_command("/imagine", "a lighthouse --model sdxl-base --lora pixel-art:0.5")
    await slack.fake.wait_for(lambda: result_messages(slack.fake))
    sent = slack.backend.succeeded[-1]
    assert (sent.model, sent.loras) == ("sdxl-base", (LoraSpec("pixel-art", 0.5),))
    assert "model sdxl-base · lora pixel-art:0.5" in result_messages(slack.fake)[-1].text

    refused = await answer(slack, "/imagine", "a fox --lora ink --model sdxl-base")
    assert "The LoRA ink doesn't work with sdxl-base (it is for sd15-base)" in refused


async def test_workspace_admins_choose_the_models(slack: Running):
    offer_models(slack)
    said = await answer(slack, "/imagine-admin", "default-model sdxl-base", user=ADMIN_ID)
    assert said.startswith("Default model for this workspace: *sdxl-base*.")
    said = await answer(slack, "/imagine-admin", "allow-models sdxl-base", user=ADMIN_ID)
    assert "(chosen by this workspace's admins)" in said and "sd15-base" not in said
    said = await answer(slack, "/imagine-admin", "allow-loras detail, pixel-art", user=ADMIN_ID)
    assert "LoRAs: detail, pixel-art" in said
    refused = await answer(slack, "/imagine", "a fox --model sd15-base")
    assert "The model sd15-base is not allowed here. Allowed here: sdxl-base." in refused
    assert "admin" in (await answer(slack, "/imagine-admin", "allow-models all")).lower()  # not an admin
    said = await answer(slack, "/imagine-admin", "default-model", user=ADMIN_ID)
    assert "`default-model` needs model or LoRA names, or `none`" in said
    said = await answer(slack, "/imagine-admin", "allow-models all", user=ADMIN_ID)
    assert "(chosen by" in said  # the LoRA list still narrows the choice
    said = await answer(slack, "/imagine-admin", "allow-loras all", user=ADMIN_ID)
    assert "(chosen by" not in said and "sd15-base" in said
