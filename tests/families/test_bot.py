"""The bot adapts to the model behind the server: bot core + inference-server backend against the
real server on the tiny FLUX pipelines. `--ar 3:2` gives a size FLUX accepts (multiples of 16
around its default size), the defaults are the model's, and a flag the model can't honour is
refused before a job is queued."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot.backends.inference_server import InferenceServerBackend
from bot.bootstrap import Core, build_core
from bot.core.api import BadParameters
from inference_server.tiny_families import TinyFamily
from tests.core.helpers import ALICE, GUILD, RecordingDelivery, config_for
from tests.server.conftest import TOKEN, make_config, running_server


@asynccontextmanager
async def bot_on(
    name: TinyFamily, family_path: Callable[[TinyFamily], Path], tmp_path: Path
) -> AsyncIterator[tuple[Core, RecordingDelivery]]:
    """The real server on a tiny model of family `name` (default size 64x64), and the bot's core
    talking to it through the inference-server backend, as in production."""
    model = {"width": 64, "height": 64, "steps": None, "guidance": None}
    async with running_server(make_config(family_path(name), model=model)) as server:
        backend = InferenceServerBackend([server.url], token=TOKEN, max_retries=0)
        delivery = RecordingDelivery()
        config = config_for(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", tmp_path)
        async with build_core(config, {}, backend=backend) as core:
            core.service.register_delivery("discord", delivery)
            yield core, delivery


async def imagine(
    core: Core, delivery: RecordingDelivery, text: str, key: str
) -> tuple[Any, list[Image.Image]]:
    job = await core.service.imagine(ALICE, GUILD, text, idempotency_key=key)
    await delivery.wait_for(lambda: job.id in delivery.succeeded or job.id in delivery.failed)
    assert job.id not in delivery.failed, delivery.failed[job.id]
    [(view, results)] = delivery.succeeded[job.id]
    return view, [Image.open(io.BytesIO(r.png)) for r in results]


async def test_ar_on_flux_dev_gives_a_size_it_accepts(
    family_path: Callable[[TinyFamily], Path], tmp_path: Path
) -> None:
    async with bot_on("flux_dev", family_path, tmp_path) as (core, delivery):
        assert core.service.model is not None and core.service.model.family == "flux-dev"
        # 3:2 around 64x64 in multiples of 16 (multiples of 8 would give 80x56, which FLUX refuses).
        view, images = await imagine(core, delivery, "a red fox --ar 3:2 --n 2 --steps 2", "ar")
        assert (view.params.width, view.params.height) == (80, 48)
        assert [im.size for im in images] == [(80, 48)] * 2
        # Defaults are the model's: FLUX.1-dev's distilled guidance 3.5 and 28 steps.
        view, _ = await imagine(core, delivery, "a fox --no blurry", "defaults")
        assert (view.params.guidance, view.params.steps) == (3.5, 28)
        assert (view.params.width, view.params.height) == (64, 64)


async def test_a_flag_schnell_cant_honour_is_refused_before_queueing(
    family_path: Callable[[TinyFamily], Path], tmp_path: Path
) -> None:
    async with bot_on("flux_schnell", family_path, tmp_path) as (core, delivery):
        with pytest.raises(BadParameters) as refused:
            await core.service.imagine(ALICE, GUILD, "a fox --guidance 7", idempotency_key="g")
        assert (
            refused.value.field == "guidance" and "FLUX.1-schnell takes no guidance" in refused.value.message
        )
        assert await core.service.history(ALICE) == []  # nothing was queued
        view, images = await imagine(core, delivery, "a fox --ar 2:3", "ok")
        assert (view.params.guidance, view.params.steps) == (0.0, 4)
        assert images[0].size == (48, 80)
