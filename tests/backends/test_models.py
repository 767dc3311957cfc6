"""The inference-server backend with a models registry: it learns which server hosts which model and
LoRAs from their GET /v1/models, sends a job only to servers that host its model (keeping the order
and failover among those), sends `model`/`loras` only when set, and maps the registry's 400s."""

from __future__ import annotations

import pytest

from bot.backends.base import BackendRejected, GenerationParams, LoraSpec
from bot.backends.inference_server import InferenceServerBackend
from bot.core.api import BadParameters
from tests.backends.fakes import TOKEN, FakeInferenceServer, error
from tests.backends.test_capabilities import reported


def sd15() -> dict:
    return reported(family="sd", label="Stable Diffusion 1.5", size_multiple=8, max_side=1024)


def sdxl() -> dict:
    return reported(family="sdxl", label="SDXL", size_multiple=8, max_side=2048)


def serve(fake: FakeInferenceServer, models: dict[str, list[str]] | None, caps: dict | None = None) -> None:
    fake.capabilities = caps or sd15()
    fake.models = models
    if models:
        fake.model_capabilities = {name: (sdxl() if "xl" in name else sd15()) for name in models}


def job(model: str | None = None, *loras: LoraSpec) -> GenerationParams:
    return GenerationParams(task="txt2img", prompt="a fox", seeds=(1,), model=model, loras=loras)


@pytest.fixture
async def two_models(inference_server: FakeInferenceServer, second_inference_server: FakeInferenceServer):
    serve(inference_server, {"sd15-base": ["ink", "detail"]})
    serve(second_inference_server, {"sdxl-base": ["detail"], "sd15-base": []})
    backend = InferenceServerBackend(
        [inference_server.url, second_inference_server.url], token=TOKEN, max_retries=0, stream=False
    )
    yield backend, inference_server, second_inference_server
    await backend.close()


async def test_models_merge_what_the_servers_list(two_models) -> None:
    backend, a, b = two_models
    models = await backend.models()
    assert models is not None
    by_name = {m.name: m for m in models}
    assert list(by_name) == ["sd15-base", "sdxl-base"]  # the default first
    assert by_name["sd15-base"].servers == (a.url, b.url) and by_name["sd15-base"].default
    assert by_name["sd15-base"].loras == ("ink", "detail")  # what any server has
    assert by_name["sdxl-base"].servers == (b.url,) and by_name["sdxl-base"].capabilities.family == "sdxl"


async def test_servers_from_before_the_registry_offer_no_choice(
    inference_server: FakeInferenceServer, second_inference_server: FakeInferenceServer
) -> None:
    serve(inference_server, None)
    serve(second_inference_server, None)
    backend = InferenceServerBackend([inference_server.url, second_inference_server.url], token=TOKEN)
    try:
        assert await backend.models() is None
        await backend.generate(job())  # a job without a model goes out as before...
        assert "model" not in inference_server.seen[-1].body and "loras" not in inference_server.seen[-1].body
        with pytest.raises(BackendRejected, match="no inference server has the model sdxl"):
            await backend.generate(job("sdxl"))  # ...and one naming a model goes nowhere
    finally:
        await backend.close()


async def test_a_mixed_fleet_sends_named_models_only_to_the_registry_server(
    inference_server: FakeInferenceServer, second_inference_server: FakeInferenceServer
) -> None:
    serve(inference_server, None)  # from before the registry: it would refuse a `model` field
    serve(second_inference_server, {"sdxl-base": ["detail"]})
    backend = InferenceServerBackend(
        [inference_server.url, second_inference_server.url], token=TOKEN, max_retries=0, stream=False
    )
    try:
        assert [m.name for m in await backend.models() or ()] == ["sdxl-base"]
        for _ in range(3):
            await backend.generate(job("sdxl-base", LoraSpec("detail")))
        for _ in range(2):
            await backend.generate(job())  # the default model: both, round-robin
        assert [s.body.get("model") for s in inference_server.seen] == [None]
        assert [s.body.get("model") for s in second_inference_server.seen] == ["sdxl-base"] * 3 + [None]
    finally:
        await backend.close()


async def test_a_job_goes_only_to_the_servers_that_host_its_model_and_loras(two_models) -> None:
    backend, a, b = two_models
    await backend.models()
    for _ in range(4):
        await backend.generate(job("sdxl-base"))
    assert [s.body["model"] for s in b.seen] == ["sdxl-base"] * 4 and not a.seen
    for _ in range(3):
        await backend.generate(job("sd15-base", LoraSpec("ink", 0.7)))
    assert len(a.seen) == 3  # only the first server has the LoRA "ink"
    assert a.seen[-1].body["loras"] == [{"name": "ink", "weight": 0.7}]
    before = (len(a.seen), len(b.seen))
    for _ in range(4):
        await backend.generate(job())  # no model: every server, round-robin as before
    assert (len(a.seen) - before[0], len(b.seen) - before[1]) == (2, 2)
    with pytest.raises(BackendRejected, match="no inference server has the model flux") as e:
        await backend.generate(job("flux"))
    assert e.value.field == "model"


async def test_failover_among_the_hosts_of_a_model(
    inference_server: FakeInferenceServer, second_inference_server: FakeInferenceServer, refused_url: str
) -> None:
    serve(inference_server, {"sdxl-base": []})
    serve(second_inference_server, {"sdxl-base": [], "sd15-base": []})
    backend = InferenceServerBackend(
        [refused_url, inference_server.url, second_inference_server.url],
        token=TOKEN,
        max_retries=0,
        stream=False,
    )

    async def busy(request, body):
        return error(503, "overloaded", "queue full")

    try:
        await backend.models()
        # The first server was never heard from: it may host the model, so it is tried after the
        # hosts. The host asked first is busy: the job fails over to the other host.
        inference_server.script = [busy]
        await backend.generate(job("sdxl-base"))
        assert [len(inference_server.seen), len(second_inference_server.seen)] == [1, 1]
        # A model only the second server has never goes to the first, busy or not.
        inference_server.script = []
        for _ in range(3):
            await backend.generate(job("sd15-base"))
        assert [len(inference_server.seen), len(second_inference_server.seen)] == [1, 4]
    finally:
        await backend.close()


async def test_a_server_whose_list_changed_hands_the_job_on_and_the_registrys_400s_are_clear(
    two_models,
) -> None:
    backend, a, b = two_models
    await backend.models()
    b.models = {"sdxl-base": ["detail"]}  # sd15-base unloaded since the bot asked
    for _ in range(2):
        await backend.generate(job("sd15-base"))
    assert len(a.seen) == 2  # whichever server was asked first, the job ran on the one that has it
    a.models = {"other": []}
    with pytest.raises(BackendRejected, match="that model is not available: model 'sd15-base'"):
        await backend.generate(job("sd15-base"))
    with pytest.raises(BackendRejected, match="that LoRA can't be used this way") as e:
        await backend.generate(job("sdxl-base", LoraSpec("detail", 5.0)))
    assert e.value.field == "loras[0].weight"


async def test_the_core_learns_the_models_and_routes_jobs_through_the_dispatcher(
    inference_server: FakeInferenceServer, second_inference_server: FakeInferenceServer, tmp_path
) -> None:
    """End to end: ModelWatch reads both servers' lists into the core, which checks --model against
    them; the dispatcher's job then runs only on the server that hosts the model."""
    from tests.core.helpers import ALICE, GUILD, running_core

    small = {"default_width": 64, "default_height": 64}
    serve(inference_server, {"sd15-base": ["ink"]}, sd15() | small)
    serve(second_inference_server, {"sdxl-base": []}, sdxl() | small)
    inference_server.model_capabilities = {"sd15-base": sd15() | small}
    second_inference_server.model_capabilities = {"sdxl-base": sdxl() | small | {"max_steps": 40}}
    backend = InferenceServerBackend(
        [inference_server.url, second_inference_server.url], token=TOKEN, max_retries=0
    )
    async with running_core(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", tmp_path, backend=backend) as (
        core,
        _,
    ):
        s = core.service
        assert [(m.name, m.servers) for m in s.catalog.models] == [
            ("sd15-base", (inference_server.url,)),
            ("sdxl-base", (second_inference_server.url,)),
        ]
        with pytest.raises(BadParameters, match="--steps must be from 1 to 40"):
            await s.imagine(ALICE, GUILD, "a fox --model sdxl-base --steps 45", idempotency_key="a")
        jobs = [
            await s.imagine(ALICE, GUILD, f"a fox {i} --model sdxl-base --steps 3", idempotency_key=f"x{i}")
            for i in range(3)
        ]
        jobs.append(await s.imagine(ALICE, GUILD, "a fox --lora ink:0.5 --steps 3", idempotency_key="y"))
        done = [await s.wait_for_job(j.id, 30) for j in jobs]
    assert all(j.state == "succeeded" for j in done), [j.error for j in done]
    assert [x.body["model"] for x in second_inference_server.seen] == ["sdxl-base"] * 3
    assert [(x.body["model"], x.body["loras"]) for x in inference_server.seen] == [
        ("sd15-base", [{"name": "ink", "weight": 0.5}])
    ]
