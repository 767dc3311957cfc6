"""The registry's policies through a real server: batches group by (model, LoRA set and weights),
models beyond the memory budget are unloaded least-recently-used and load again when asked for, and
the continuous engine hands requests for other models and with LoRAs to a request-level engine."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from inference_server import keys
from inference_server.config import BatchingConfig
from inference_server.pipelines import pipeline_bytes
from tests.families.helpers import wait_queued
from tests.models.conftest import registry_config, tiny_model
from tests.server.conftest import AUTH, DeviceGate, Server, decode_png, running_server


async def test_batches_group_by_model_and_lora_set(models_server: Callable[..., Any]) -> None:
    async with models_server() as server:
        await server.generate("txt2img", {"prompt": "load it", "model": "xl"})  # loaded before the gate
        gate = DeviceGate(server)
        first = asyncio.ensure_future(server.generate("txt2img", {"prompt": "hold", "seed": 0}))
        await gate.wait_entered()
        style = [{"name": "style", "weight": 1.0}]
        bodies: dict[str, dict[str, Any]] = {
            "plain1": {},
            "plain2": {},
            "style1": {"loras": style},
            "style2": {"loras": style},
            "half": {"loras": [{"name": "style", "weight": 0.5}]},
            "both1": {"loras": [{"name": "style", "weight": 1}, {"name": "detail", "weight": 1}]},
            # The same set in another order is the same computation: it joins both1.
            "both2": {"loras": [{"name": "detail", "weight": 1}, {"name": "style", "weight": 1}]},
            "xl": {"model": "xl"},
        }
        tasks = {}
        for i, (label, extra) in enumerate(bodies.items()):
            tasks[label] = asyncio.ensure_future(
                server.generate("txt2img", {"prompt": label, "seed": i, **extra})
            )
            await wait_queued(server, i + 1)
        gate.open()
        results = {label: await task for label, task in tasks.items()}
        await first
    sizes = {label: r["batch_size"] for label, r in results.items()}
    assert sizes == {
        "plain1": 2,
        "plain2": 2,
        "style1": 2,
        "style2": 2,
        "half": 1,
        "both1": 2,
        "both2": 2,
        "xl": 1,
    }
    assert results["xl"]["model"] == "xl" and results["plain1"]["model"] == "sd15"


def _bytes(path: Path) -> int:
    from diffusers import DiffusionPipeline

    return pipeline_bytes(DiffusionPipeline.from_pretrained(str(path)))


async def loaded(server: Server) -> dict[str, bool]:
    async with server.session.get(f"{server.url}/v1/models", headers=AUTH) as r:
        return {m["id"]: m["loaded"] for m in (await r.json())["data"]}


async def test_least_recently_used_model_is_unloaded_past_the_budget(
    sd15_path: Path, sdxl_path: Path
) -> None:
    sd15, xl = _bytes(sd15_path), _bytes(sdxl_path)
    # Room for the default and the larger of the two others, never for all three.
    budget_mb = (sd15 + max(sd15, xl) + min(sd15, xl) // 2) / 2**20
    config = registry_config(
        sd15_path,
        sdxl_path,
        memory_budget_mb=budget_mb,
        models={
            "sd15": tiny_model(sd15_path, default=True),
            "xl": tiny_model(sdxl_path),
            "other": tiny_model(sd15_path, steps=3),
        },
    )
    async with running_server(config) as server:
        assert await loaded(server) == {"sd15": True, "xl": False, "other": False}
        first = await server.generate("txt2img", {"prompt": "a", "seed": 1, "model": "xl"})
        assert await loaded(server) == {"sd15": True, "xl": True, "other": False}
        await server.generate("txt2img", {"prompt": "a", "model": "other"})
        assert await loaded(server) == {"sd15": True, "xl": False, "other": True}
        again = await server.generate("txt2img", {"prompt": "a", "seed": 1, "model": "xl"})
        assert await loaded(server) == {"sd15": True, "xl": True, "other": False}
        # The default model stays: it is never the one unloaded.
        await server.generate("txt2img", {"prompt": "a"})
        metrics = await server.metrics()
        assert server.app[keys.REGISTRY].loaded_bytes() <= budget_mb * 2**20
    assert metrics['inference_model_evictions_total{model="xl"}'] == 1
    assert metrics['inference_model_evictions_total{model="other"}'] == 1
    assert metrics['inference_model_load_seconds_count{model="xl"}'] == 2
    assert metrics.get('inference_model_evictions_total{model="sd15"}', 0) == 0
    # Reloaded from disk, the model makes the same image.
    assert np.array_equal(
        np.asarray(decode_png(first["images"][0]["png_base64"])),
        np.asarray(decode_png(again["images"][0]["png_base64"])),
    )


async def test_all_models_load_at_start_when_asked(models_server: Callable[..., Any]) -> None:
    async with models_server(load="start") as server:
        assert await loaded(server) == {"sd15": True, "xl": True}


async def test_continuous_engine_routes_other_models_and_loras(models_server: Callable[..., Any]) -> None:
    batching = BatchingConfig(engine="continuous", max_batch_size=8, max_wait_ms=50.0, max_queue=32)
    async with models_server(batching=batching) as server:
        async with server.session.get(f"{server.url}/health") as r:
            assert (await r.json())["engine"] == "continuous"
        base = await server.generate("txt2img", {"prompt": "a dog", "seed": 4})
        styled = await server.generate(
            "txt2img", {"prompt": "a dog", "seed": 4, "loras": [{"name": "style", "weight": 1}]}
        )
        zero = await server.generate(
            "txt2img", {"prompt": "a dog", "seed": 4, "loras": [{"name": "style", "weight": 0}]}
        )
        xl = await server.generate("txt2img", {"prompt": "a dog", "model": "xl"})
        plain_again = await server.generate("txt2img", {"prompt": "a dog", "seed": 4})
        registry = server.app[keys.REGISTRY]
        # LoRAs went to a second copy of the default model; the continuous engine's has none.
        assert registry.default_runner._adapters == set()
        assert registry.entry("sd15", loras=True).runner._adapters == {"style"}
    images = [
        np.asarray(decode_png(r["images"][0]["png_base64"]), dtype=np.int16) for r in (base, styled, zero)
    ]
    assert xl["model"] == "xl"
    assert np.abs(images[1] - images[0]).mean() > 1
    # Weight 0 on the request-level copy: the base model's image, up to the two engines' own rounding.
    assert np.abs(images[2] - images[0]).max() <= 2
    assert np.array_equal(
        np.asarray(decode_png(plain_again["images"][0]["png_base64"]), dtype=np.int16), images[0]
    )
