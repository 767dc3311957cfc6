"""Models and LoRAs through the real discord.py bot against the fake Discord: the /imagine `model` and
`lora` options and flags, their autocomplete, /models, /help, a refusal naming what there is, a
re-roll button keeping the model and LoRAs, and the admins' default model and allow-lists."""

from __future__ import annotations

from bot.backends.base import LoraSpec
from bot.backends.fake import FakeBackend
from tests.core.test_models import SD15, SDXL
from tests.discord.fake_discord import FakeDiscord
from tests.discord.harness import App, app_config, result_job, wait_ephemeral, wait_result


def backend() -> FakeBackend:
    return FakeBackend(models=[SD15, SDXL])


async def test_model_and_loras_from_options_and_flags_end_to_end(fake_discord: FakeDiscord, tmp_path):
    alice = fake_discord.user("alice")
    fake = backend()
    async with App(fake_discord, app_config(tmp_path, fake_discord), backend=fake) as app:
        rec = await fake_discord.slash(
            "imagine",
            alice,
            {
                "prompt": "a lighthouse --lora pixel-art:1.5 --seed 9",
                "model": "sdxl-base",
                "lora": "detail:0.5",
            },
        )
        result = await wait_result(fake_discord, rec)
        job = await result_job(app, result)
        assert (job.params.model, job.params.loras) == (
            "sdxl-base",
            (LoraSpec("pixel-art", 1.5), LoraSpec("detail", 0.5)),
        )
        assert "model sdxl-base · lora pixel-art:1.5, detail:0.5" in result["content"]
        sent = fake.succeeded[-1]
        assert (sent.model, sent.loras) == ("sdxl-base", job.params.loras)

        # the re-roll button keeps them
        click = await fake_discord.click(result, f"imagine:reroll:{job.id}", alice)
        rerolled = await result_job(app, await wait_result(fake_discord, click))
        assert rerolled.kind == "reroll" and rerolled.params.seed != job.params.seed
        assert (rerolled.params.model, rerolled.params.loras) == (job.params.model, job.params.loras)
        assert (fake.succeeded[-1].model, fake.succeeded[-1].loras) == ("sdxl-base", job.params.loras)

        # refusals name what there is, privately, and queue nothing
        bad = await fake_discord.slash("imagine", alice, {"prompt": "a fox", "model": "flux"})
        assert await wait_ephemeral(fake_discord, bad) == (
            "⛔ There is no model 'flux'. Models: sd15-base, sdxl-base."
        )
        bad = await fake_discord.slash("imagine", alice, {"prompt": "a fox --lora ink:7"})
        assert "weight must be a number from -2 to 2, got '7'" in await wait_ephemeral(fake_discord, bad)
        assert len(fake.calls) == 2


async def test_autocomplete_models_and_help(fake_discord: FakeDiscord, tmp_path):
    alice, boss = fake_discord.user("alice"), fake_discord.user("boss", admin=True)
    async with App(fake_discord, app_config(tmp_path, fake_discord), backend=backend()):
        rec = await fake_discord.autocomplete("imagine", alice, {"prompt": "a fox", "model": "xl"}, "model")
        await fake_discord.wait_for(lambda: rec.choices is not None, what="model suggestions")
        assert rec.choices == [{"name": "sdxl-base (SDXL)", "value": "sdxl-base"}]
        rec = await fake_discord.autocomplete("imagine", alice, {"prompt": "a fox", "model": ""}, "model")
        await fake_discord.wait_for(lambda: rec.choices is not None, what="model suggestions")
        assert [c["value"] for c in rec.choices] == ["sd15-base", "sdxl-base"]
        assert rec.choices[0]["name"] == "sd15-base (Stable Diffusion 1.5, default)"
        # LoRAs follow the model chosen in the same command (the default's without one); a typed
        # weight is kept
        rec = await fake_discord.autocomplete(
            "imagine", alice, {"prompt": "a fox", "model": "sdxl-base", "lora": ":0.7"}, "lora"
        )
        await fake_discord.wait_for(lambda: rec.choices is not None, what="LoRA suggestions")
        assert [c["value"] for c in rec.choices] == ["detail:0.7", "pixel-art:0.7"]
        rec = await fake_discord.autocomplete("imagine", alice, {"prompt": "a fox", "lora": "in"}, "lora")
        await fake_discord.wait_for(lambda: rec.choices is not None, what="LoRA suggestions")
        assert [c["value"] for c in rec.choices] == ["ink"]

        listing = await wait_ephemeral(fake_discord, await fake_discord.slash("models", alice))
        assert listing.splitlines()[:3] == [
            "**Models you can use here**",
            "• **sd15-base** — Stable Diffusion 1.5, default here; LoRAs: ink, detail",
            "• **sdxl-base** — SDXL, loads on first use; LoRAs: detail, pixel-art",
        ]
        help_text = await wait_ephemeral(fake_discord, await fake_discord.slash("help", alice))
        assert "**Models**: sd15-base (default), sdxl-base. Pick one with --model NAME" in help_text

        # the admins narrow the choice: the suggestions and the listing follow
        set_default = await fake_discord.slash(
            "admin", boss, {"model": "sdxl-base"}, subcommand=["default-model"]
        )
        assert "This server's default model is now **sdxl-base**" in await wait_ephemeral(
            fake_discord, set_default
        )
        allow = await fake_discord.slash("admin", boss, {"models": "sdxl-base"}, subcommand=["allow-models"])
        assert "(chosen by this server's admins)" in await wait_ephemeral(fake_discord, allow)
        allow = await fake_discord.slash("admin", boss, {"loras": "detail"}, subcommand=["allow-loras"])
        assert "• **sdxl-base** — SDXL, default here, loads on first use; LoRAs: detail" in (
            await wait_ephemeral(fake_discord, allow)
        )
        rec = await fake_discord.autocomplete("imagine", alice, {"prompt": "a fox", "model": ""}, "model")
        await fake_discord.wait_for(lambda: rec.choices is not None, what="model suggestions")
        assert rec.choices == [{"name": "sdxl-base (SDXL, default)", "value": "sdxl-base"}]
        rec = await fake_discord.autocomplete(
            "admin", boss, {"model": "sd"}, "model", subcommand=["default-model"]
        )
        await fake_discord.wait_for(lambda: rec.choices is not None, what="admin model suggestions")
        assert [c["value"] for c in rec.choices] == ["sdxl-base"]
        refused = await fake_discord.slash("imagine", alice, {"prompt": "a fox", "model": "sd15-base"})
        assert await wait_ephemeral(fake_discord, refused) == (
            "⛔ The model sd15-base is not allowed here. Allowed here: sdxl-base."
        )
        not_admin = await fake_discord.slash("admin", alice, {"models": ""}, subcommand=["allow-models"])
        assert "⛔" in await wait_ephemeral(fake_discord, not_admin)
