"""Models and LoRAs in the core: the `--model`/`--lora` flags, refusals at submit time naming what
is available, limits from the job's model, follow-ups keeping the parent's model and LoRAs, and a
guild's default model and allow-lists (audited), on SQLite and PostgreSQL."""

from __future__ import annotations

import random
from typing import Any

import pytest

from bot.backends.base import LoraSpec, ModelCapabilities, ModelInfo
from bot.backends.fake import FakeBackend
from bot.config import BotConfig
from bot.core.api import BadParameters, NotAdmin, Place
from bot.core.model_choice import GuildModels, ModelCatalog, choose
from bot.core.operations import remix_text
from bot.core.params import MAX_LORAS, ModelRequest, model_request, parse_prompt
from tests.backends.test_capabilities import reported
from tests.core.helpers import ADMIN, ALICE, BOB, GUILD, running_core


def caps(family: str, label: str, **changes: Any) -> ModelCapabilities:
    """Small sizes (the fake renders them), the rest as the real server reports."""
    base = dict(family=family, label=label, default_width=64, default_height=64, size_multiple=8, min_side=8)
    return ModelCapabilities.from_json(reported(**(base | changes)))


SD15 = ModelInfo("sd15-base", "sd", caps("sd", "Stable Diffusion 1.5", guidance="cfg", negative_prompt="cfg"),
                 loras=("ink", "detail"), default=True)  # fmt: skip
SDXL = ModelInfo("sdxl-base", "sdxl", caps("sdxl", "SDXL", guidance="cfg", max_steps=50, negative_prompt="cfg"),
                 loras=("detail", "pixel-art"), loaded=False)  # fmt: skip
CATALOG = ModelCatalog([SD15, SDXL])


def backend() -> FakeBackend:
    return FakeBackend(models=[SD15, SDXL])


# -- the flags --------------------------------------------------------------------------------------


def test_model_and_lora_flags_parse_with_default_weight_and_options() -> None:
    got = model_request("a fox --model sdxl-base --lora ink --lora detail:-0.5 --seed 3", None)
    assert got == ModelRequest("sdxl-base", (LoraSpec("ink", 1.0), LoraSpec("detail", -0.5)))
    # a slash command's options: `model` replaces --model, `lora` adds (commas or spaces)
    got = model_request("a fox --lora ink:2", {"model": "sd15-base", "lora": "detail:0.25, pixel-art"})
    assert got.model == "sd15-base" and [x.name for x in got.loras] == ["ink", "detail", "pixel-art"]
    # the other flags are unaffected, and parse_prompt takes the model flags as known
    parsed = parse_prompt(
        "a fox --model sdxl-base --lora ink --steps 4", None, BotConfig(), rng=random.Random(0)
    )
    assert (parsed.prompt, parsed.steps) == ("a fox", 4)


@pytest.mark.parametrize(
    ("text", "flag", "says"),
    [
        ("a fox --lora ink:abc", "lora", "weight must be a number from -2 to 2, got 'abc'"),
        ("a fox --lora ink:2.5", "lora", "from -2 to 2, got '2.5'"),
        ("a fox --lora ink:nan", "lora", "from -2 to 2"),
        ("a fox --lora ink:", "lora", "must look like NAME or NAME:WEIGHT"),
        ("a fox --lora :0.5", "lora", "must look like NAME or NAME:WEIGHT"),
        ("a fox --lora", "lora", "needs one value"),
        ("a fox --lora ink and more", "lora", "put the prompt before the flags"),
        ("a fox --lora ink --lora INK:0.3", "lora", "--lora INK is given twice"),
        (
            "a fox " + " ".join(f"--lora l{i}" for i in range(MAX_LORAS + 1)),
            "lora",
            f"At most {MAX_LORAS} LoRAs",
        ),
        ("a fox --model a --model b", "model", "--model is given twice"),
        ("a fox --model ../etc:x", "model", "--model needs a model name"),
    ],
)
def test_bad_model_and_lora_flags_are_refused_naming_the_flag(text: str, flag: str, says: str) -> None:
    with pytest.raises(BadParameters) as e:
        model_request(text, None)
    assert e.value.field == flag and says in e.value.message


def test_choices_name_what_is_available() -> None:
    none = GuildModels()
    assert choose(ModelRequest(), CATALOG, none, None).model is None  # nothing asked: the default
    got = choose(ModelRequest("SDXL-base", (LoraSpec("Pixel-Art", 0.5),)), CATALOG, none, None)
    assert (got.model, got.loras, got.capabilities) == (
        "sdxl-base",
        (LoraSpec("pixel-art", 0.5),),
        SDXL.capabilities,
    )
    # a LoRA without --model is checked against (and runs on) the default model, named
    assert choose(ModelRequest(None, (LoraSpec("ink"),)), CATALOG, none, None).model == "sd15-base"
    cases = [
        (ModelRequest("flux"), "There is no model 'flux'. Models: sd15-base, sdxl-base."),
        (
            ModelRequest(None, (LoraSpec("glow"),)),
            "There is no LoRA 'glow'. LoRAs for sd15-base: ink, detail.",
        ),
        (
            ModelRequest("sdxl-base", (LoraSpec("ink"),)),
            "The LoRA ink doesn't work with sdxl-base (it is for sd15-base). LoRAs for sdxl-base: detail, pixel-art.",
        ),
    ]
    for request, message in cases:
        with pytest.raises(BadParameters) as e:
            choose(request, CATALOG, none, None)
        assert e.value.message == message
    with pytest.raises(BadParameters, match="offers one model and no LoRAs"):
        choose(ModelRequest("sdxl-base"), ModelCatalog(), none, None)
    here = GuildModels(allowed_models=("sdxl-base",), allowed_loras=("detail",))
    assert choose(ModelRequest(), CATALOG, here, None).model == "sdxl-base"  # the first allowed
    with pytest.raises(BadParameters, match="sd15-base is not allowed here. Allowed here: sdxl-base"):
        choose(ModelRequest("sd15-base"), CATALOG, here, None)
    with pytest.raises(BadParameters, match="pixel-art is not allowed here. Allowed here: detail"):
        choose(ModelRequest("sdxl-base", (LoraSpec("pixel-art"),)), CATALOG, here, None)


# -- through the core, on the database -------------------------------------------------------------


async def test_a_job_runs_on_its_model_with_its_loras_and_their_limits(db_url, tmp_path) -> None:
    fake = backend()
    async with running_core(db_url, tmp_path, backend=fake) as (core, _):
        s = core.service
        assert [m.name for m in s.catalog.models] == ["sd15-base", "sdxl-base"]  # from models()
        job = await s.imagine(
            ALICE, GUILD, "a fox --model sdxl-base --lora detail:0.5 --steps 40", idempotency_key="a"
        )
        assert job.params.model == "sdxl-base" and job.params.loras == (LoraSpec("detail", 0.5),)
        done = await s.wait_for_job(job.id, 30)
        assert done.state == "succeeded"
        sent = fake.succeeded[-1]
        assert (sent.model, sent.loras, sent.steps) == ("sdxl-base", (LoraSpec("detail", 0.5),), 40)
        # SDXL here takes at most 50 steps: the limit is the job's model's, checked at submit
        with pytest.raises(BadParameters, match="--steps must be from 1 to 50"):
            await s.imagine(ALICE, GUILD, "a fox --model sdxl-base --steps 60", idempotency_key="b")
        assert (await s.imagine(ALICE, GUILD, "a fox --steps 60", idempotency_key="c")).params.steps == 60
        # an unknown model or LoRA is refused at submit, naming what there is; no job, no charge
        used = (await s.quota(ALICE, GUILD)).used_today
        with pytest.raises(BadParameters, match="There is no model 'flux'. Models: sd15-base, sdxl-base"):
            await s.imagine(ALICE, GUILD, "a fox --model flux", idempotency_key="d")
        with pytest.raises(BadParameters, match="doesn't work with sdxl-base"):
            await s.imagine(ALICE, GUILD, "a fox", {"model": "sdxl-base", "lora": "ink"}, idempotency_key="e")
        assert (await s.quota(ALICE, GUILD)).used_today == used
        assert len(await s.history(ALICE)) == 2  # the two jobs accepted


async def test_follow_ups_keep_the_parents_model_and_loras(db_url, tmp_path) -> None:
    fake = backend()
    async with running_core(db_url, tmp_path, backend=fake) as (core, _):
        s = core.service
        parent = await s.imagine(
            ALICE, GUILD, "a barn --model sdxl-base --lora pixel-art:1.5 --seed 5", idempotency_key="p"
        )
        parent = await s.wait_for_job(parent.id, 30)
        ref = {"job_id": parent.id}
        jobs = [
            await s.reroll(ALICE, GUILD, **ref, idempotency_key="r"),
            await s.variation(ALICE, GUILD, 0, **ref, idempotency_key="v"),
            await s.upscale(ALICE, GUILD, 0, **ref, idempotency_key="u"),
            await s.zoom_out(ALICE, GUILD, 2, **ref, idempotency_key="z"),
            await s.remix(ALICE, GUILD, remix_text(parent).replace("a barn", "a red barn"), **ref,
                          idempotency_key="x"),
        ]  # fmt: skip
        assert "--model sdxl-base --lora pixel-art:1.5" in remix_text(parent)
        for job in jobs:
            done = await s.wait_for_job(job.id, 30)
            assert done.state == "succeeded", (job.kind, done.error)
            assert (done.params.model, done.params.loras) == ("sdxl-base", (LoraSpec("pixel-art", 1.5),))
        assert all(
            c.model == "sdxl-base" and c.loras == (LoraSpec("pixel-art", 1.5),) for c in fake.succeeded
        )
        from bot.core.describe import describe

        assert "model sdxl-base · lora pixel-art:1.5" in describe(jobs[0])
        # the model is gone from the servers: a re-roll is refused clearly, not failed later
        s.catalog = ModelCatalog([SD15])
        with pytest.raises(BadParameters, match="The model sdxl-base of that image is no longer offered"):
            await s.reroll(ALICE, GUILD, **ref, idempotency_key="r2")


async def test_upscaler_model_replaces_the_model_without_its_loras(sqlite_url, tmp_path) -> None:
    upscaler = ModelInfo("upscaler", "sd", SD15.capabilities)
    fake = FakeBackend(models=[SD15, SDXL, upscaler])
    async with running_core(sqlite_url, tmp_path, backend=fake, bot={"upscaler_model": "upscaler"}) as (
        core,
        _,
    ):
        s = core.service
        parent = await s.wait_for_job(
            (await s.imagine(ALICE, GUILD, "a barn --lora ink", idempotency_key="p")).id, 30
        )
        assert parent.params.model == "sd15-base"  # a LoRA names the default model
        up = await s.wait_for_job(
            (await s.upscale(ALICE, GUILD, 0, job_id=parent.id, idempotency_key="u")).id, 30
        )
        assert up.state == "succeeded" and (up.params.model, up.params.loras) == ("upscaler", ())


OTHER_GUILD = Place("discord", "guild2", "chan9")


async def test_guild_default_model_and_allow_lists(db_url, tmp_path) -> None:
    fake = backend()
    async with running_core(db_url, tmp_path, backend=fake) as (core, _):
        s = core.service
        for call in (
            s.set_default_model(ALICE, GUILD, "sdxl-base"),
            s.allow_models(ALICE, GUILD, ["sdxl-base"]),
            s.allow_loras(ALICE, GUILD, "detail"),
        ):
            with pytest.raises(NotAdmin):
                await call
        listing = await s.set_default_model(ADMIN, GUILD, "SDXL-base")
        assert listing.default is not None and listing.default.name == "sdxl-base"
        with pytest.raises(BadParameters, match="There is no model 'flux'"):
            await s.set_default_model(ADMIN, GUILD, "flux")
        with pytest.raises(BadParameters, match="The default model here, sdxl-base, would not be allowed"):
            await s.allow_models(ADMIN, GUILD, ["sd15-base"])
        listing = await s.allow_models(ADMIN, GUILD, "sdxl-base")
        assert [m.name for m in listing.models] == ["sdxl-base"] and listing.restricted
        with pytest.raises(BadParameters, match="There is no LoRA 'glow'"):
            await s.allow_loras(ADMIN, GUILD, ["glow"])
        listing = await s.allow_loras(ADMIN, GUILD, ["detail", "ink"])
        assert listing.models[0].loras == ("detail",)  # ink is for sd15-base, not allowed here
        with pytest.raises(BadParameters, match="Model settings belong to a server or workspace"):
            await s.set_default_model(ADMIN, Place("discord", None, "dm"), "sdxl-base")

        # enforced at submit: the default applies, the rest is refused naming what is allowed
        job = await s.imagine(BOB, GUILD, "a fox", idempotency_key="g1")
        assert job.params.model == "sdxl-base"
        with pytest.raises(
            BadParameters, match="The model sd15-base is not allowed here. Allowed here: sdxl-base"
        ):
            await s.imagine(BOB, GUILD, "a fox --model sd15-base", idempotency_key="g2")
        with pytest.raises(BadParameters, match="pixel-art is not allowed here. Allowed here: detail"):
            await s.imagine(BOB, GUILD, "a fox --lora pixel-art", idempotency_key="g3")
        # another guild, and DMs, are not affected
        other = await s.imagine(BOB, OTHER_GUILD, "a fox --lora ink", idempotency_key="g4")
        assert other.params.model == "sd15-base"
        assert (await s.models(OTHER_GUILD)).default.name == "sd15-base"  # type: ignore[union-attr]

        # clearing: empty lists allow everything again, None the servers' default
        await s.allow_models(ADMIN, GUILD, [])
        await s.allow_loras(ADMIN, GUILD, [])
        listing = await s.set_default_model(ADMIN, GUILD, None)
        assert [m.name for m in listing.models] == ["sd15-base", "sdxl-base"] and not listing.restricted
        assert (await s.imagine(BOB, GUILD, "a fox", idempotency_key="g5")).params.model is None

        entries = await s.audit_log(ADMIN, limit=50)
        actions = [(e.action, e.target, e.details) for e in reversed(entries)]
    assert actions == [
        ("refused:set_default_model", "guild:guild1", {}),
        ("refused:allow_models", "guild:guild1", {}),
        ("refused:allow_loras", "guild:guild1", {}),
        ("set_default_model", "guild:guild1", {"model": "sdxl-base"}),
        ("allow_models", "guild:guild1", {"models": ["sdxl-base"]}),
        ("allow_loras", "guild:guild1", {"loras": ["detail", "ink"]}),
        ("allow_models", "guild:guild1", {"models": []}),
        ("allow_loras", "guild:guild1", {"loras": []}),
        ("set_default_model", "guild:guild1", {"model": None}),
    ]


async def test_a_server_without_a_registry_offers_no_choice(sqlite_url, tmp_path) -> None:
    async with running_core(sqlite_url, tmp_path) as (core, _):
        s = core.service
        listing = await s.models(GUILD)
        assert not listing.choice and listing.models == ()
        with pytest.raises(BadParameters, match="--model can't be used here"):
            await s.imagine(ALICE, GUILD, "a fox --model sdxl-base", idempotency_key="a")
        with pytest.raises(BadParameters, match="nothing to choose"):
            await s.set_default_model(ADMIN, GUILD, "sdxl-base")
        assert (await s.imagine(ALICE, GUILD, "a fox", idempotency_key="b")).params.model is None
