"""`python -m bot` says which adapters are on or off and why; bootstrap closes what it opened."""

from __future__ import annotations

from bot.__main__ import adapter_plan
from bot.backends.fake import FakeBackend
from bot.bootstrap import build_core
from tests.core.helpers import ALICE, GUILD, config_for


def test_adapter_plan_names_what_is_missing():
    plan = {name: (on, why) for name, _module, on, why in adapter_plan({})}
    assert plan["discord_adapter"] == (False, "off: DISCORD_TOKEN not set")
    assert plan["slack_adapter"][0] is False and "SLACK_BOT_TOKEN" in plan["slack_adapter"][1]
    on, why = adapter_plan({"DISCORD_TOKEN": "x"})[0][2:]
    assert on and why.startswith("on")


async def test_build_core_closes_the_backend_and_keeps_jobs_queued(sqlite_url, tmp_path):
    backend = FakeBackend()
    async with build_core(config_for(sqlite_url, tmp_path), {}, backend=backend) as core:
        # No delivery registered: the job waits in the database for a process that can deliver it.
        job = await core.service.imagine(ALICE, GUILD, "kept", idempotency_key="k")
    assert backend.closed
    async with build_core(
        config_for(sqlite_url, tmp_path), {}, backend=FakeBackend(), start_dispatcher=False
    ) as core:
        assert (await core.service.get_job(job.id)).state == "queued"


async def test_core_service_implements_the_adapters_contract(sqlite_url, tmp_path):
    """Adapters code against bot.core.api.ImageService: same methods, same signatures (each method
    of the service is the bound method of the part that does it)."""
    import inspect

    from bot.core.api import ImageService

    async with build_core(
        config_for(sqlite_url, tmp_path), {}, backend=FakeBackend(), start_dispatcher=False
    ) as core:
        assert isinstance(core.service, ImageService)
        for name, fn in inspect.getmembers(ImageService, inspect.isfunction):
            if name.startswith("_"):
                continue
            impl = getattr(core.service, name)
            contract = inspect.signature(fn)
            unbound = contract.replace(parameters=list(contract.parameters.values())[1:])  # no self
            assert inspect.signature(impl) == unbound, name
            assert inspect.iscoroutinefunction(impl) == inspect.iscoroutinefunction(fn), name
