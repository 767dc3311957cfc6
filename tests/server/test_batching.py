"""Dynamic batching over the real server: concurrent requests become one pipeline call, and an image
does not depend on what it was batched with."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from inference_server.config import ModelConfig
from inference_server.engine import GenerationRequest
from inference_server.pipelines import PipelineRunner
from tests.server.conftest import decode_png, generate_together, metric


async def test_concurrent_requests_share_one_pipeline_call(server_factory: Any) -> None:
    # Queued together behind a held device (generate_together): they meet however busy the machine.
    async with server_factory(batching={"max_wait_ms": 1000.0}) as server:
        before = await server.metrics()
        bodies = [{"prompt": f"shape {i}", "seed": i, "steps": 2} for i in range(4)]
        results = await generate_together(server, bodies)
        after = await server.metrics()
    assert [r["batch_size"] for r in results] == [4, 4, 4, 4]
    assert (
        metric(after, "inference_pipeline_calls_total") - metric(before, "inference_pipeline_calls_total")
        == 1 + 1  # and the holder's
    )
    assert (
        metric(after, 'inference_batch_size_bucket{le="4"}')
        - metric(before, 'inference_batch_size_bucket{le="4"}')
        - (
            metric(after, 'inference_batch_size_bucket{le="1"}')
            - metric(before, 'inference_batch_size_bucket{le="1"}')
        )
        == 1  # one batch of 2-4 (the holder's is of 1)
    )
    assert metric(after, "inference_images_total") == 4 + 1
    assert [r["images"][0]["seed"] for r in results] == [0, 1, 2, 3]


async def test_different_batch_keys_run_separately(server_factory: Any) -> None:
    async with server_factory(batching={"max_wait_ms": 300.0}) as server:
        bodies = [
            {"prompt": "a", "steps": 2, "seed": 1},
            {"prompt": "b", "steps": 3, "seed": 1},  # other step count
            {"prompt": "c", "steps": 2, "seed": 1, "width": 40},  # other size
            {"prompt": "d", "steps": 2, "seed": 1},
        ]
        results = await generate_together(server, bodies)
        calls = metric(await server.metrics(), "inference_pipeline_calls_total")
    assert [r["batch_size"] for r in results] == [2, 1, 1, 2]
    assert calls == 3 + 1  # and the holder's


async def test_max_batch_size_and_pixel_budget_split_batches(server_factory: Any) -> None:
    async with server_factory(batching={"max_wait_ms": 300.0, "max_batch_size": 3}) as server:
        results = await generate_together(server, [{"prompt": "x", "seed": i, "n": 2} for i in range(3)])
        calls = metric(await server.metrics(), "inference_pipeline_calls_total")
    # Each request is 2 images; a batch holds at most 3 images, so each runs alone.
    assert [r["batch_size"] for r in results] == [2, 2, 2]
    assert calls == 3 + 1  # and the holder's
    async with server_factory(batching={"max_wait_ms": 300.0, "max_batch_pixels": 2 * 32 * 32}) as server:
        results = await generate_together(server, [{"prompt": "x", "seed": i} for i in range(4)])
    assert sorted(r["batch_size"] for r in results) == [2, 2, 2, 2]


async def test_image_is_the_same_alone_or_batched(server_factory: Any) -> None:
    target = {
        "prompt": "a green triangle",
        "negative_prompt": "blurry",
        "seed": 1234,
        "steps": 3,
        "guidance": 6.0,
    }
    async with server_factory(batching={"max_wait_ms": 800.0}) as server:
        alone = await server.generate("txt2img", target)
        others = [{"prompt": f"other {i}", "seed": 99 + i, "steps": 3, "guidance": 6.0} for i in range(3)]
        batched = await generate_together(server, [others[0], target, *others[1:]])
    assert alone["batch_size"] == 1 and batched[1]["batch_size"] == 4
    a = np.asarray(decode_png(alone["images"][0]["png_base64"])).astype(int)
    b = np.asarray(decode_png(batched[1]["images"][0]["png_base64"])).astype(int)
    # PNG is 8-bit: float differences of ~1e-6 may flip a rounding, never more than one level.
    assert np.abs(a - b).max() <= 1
    assert (a == b).mean() > 0.99


@pytest.mark.parametrize("task", ["txt2img", "img2img", "inpaint"])
async def test_runner_batched_equals_solo_within_1e_5(tiny_model: Any, task: str) -> None:
    """The float output of a request is the same alone or in a batch (to 1e-5 on the CPU)."""
    from PIL import Image

    runner = PipelineRunner(
        ModelConfig(path=str(tiny_model), width=32, height=32, warmup=False, cpu_threads=1)
    )
    await runner.load()
    try:
        image = Image.new("RGB", (32, 32), (120, 40, 200))
        mask = Image.new("L", (32, 32), 0)
        mask.paste(255, (0, 0, 16, 32))

        def req(prompt: str, seeds: tuple[int, ...]) -> GenerationRequest:
            extra: dict[str, Any] = {}
            if task != "txt2img":
                extra = {"strength": 0.75, "image": image}
            if task == "inpaint":
                extra["mask"] = mask
            return GenerationRequest(task=task, prompt=prompt, negative_prompt="", seeds=seeds, width=32,
                                     height=32, steps=4, guidance=5.0, **extra)  # fmt: skip

        target = req("a red square", (5, 6))
        solo = await asyncio.to_thread(runner.generate_arrays, [target])
        batch = await asyncio.to_thread(runner.generate_arrays, [req("a", (1,)), target, req("b", (2, 3))])
    finally:
        runner.close()
    assert solo.shape == (2, 32, 32, 3) and batch.shape == (5, 32, 32, 3)
    np.testing.assert_allclose(batch[1:3], solo, atol=1e-5, rtol=0)


def test_adaptive_wait_skips_waiting_only_for_lone_sequential_traffic(tiny_model: Any) -> None:
    from inference_server.batcher import DynamicBatchingEngine
    from inference_server.config import BatchingConfig
    from inference_server.metrics import Metrics

    runner = PipelineRunner(ModelConfig(path=str(tiny_model)))  # not loaded: only the policy is used
    engine = DynamicBatchingEngine(runner, BatchingConfig(max_wait_ms=50.0), Metrics())
    assert engine.companions_likely()  # no history: wait, the safe choice for throughput
    t = 0.0
    for _ in range(8):  # one client, one request every 0.4 s
        t += 0.4
        engine.record_arrival(t)
    assert not engine.companions_likely()
    for _ in range(3):  # bursts of 8 requests a few ms apart, 0.8 s between bursts
        t += 0.8
        for _ in range(8):
            t += 0.003
            engine.record_arrival(t)
    assert engine.companions_likely()
    fixed = DynamicBatchingEngine(runner, BatchingConfig(max_wait_ms=50.0, adaptive_wait=False), Metrics())
    for i in range(8):
        fixed.record_arrival(i * 0.4)
    assert fixed.companions_likely()
    runner.close()
