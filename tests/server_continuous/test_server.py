"""The real server with `[batching] engine = "continuous"`, over loopback HTTP."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inference_server import keys
from inference_server.testing import TinyPipelineSpec, save_tiny_pipeline
from tests.server.conftest import (
    DeviceGate,
    decode_png,
    make_config,
    metric,
    png_b64,
    running_server,
    wait_for,
)
from tests.server_continuous.parity import sample_picture

CONTINUOUS = {"engine": "continuous", "max_batch_size": 4}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd-continuous") / "pipe", TinyPipelineSpec())


def pixels(payload: dict[str, Any], i: int = 0) -> np.ndarray:
    return np.asarray(decode_png(payload["images"][i]["png_base64"])).astype(int)


async def test_health_and_metrics_name_the_engine(tiny_model: Path) -> None:
    async with running_server(make_config(tiny_model, batching=CONTINUOUS)) as server:
        async with server.session.get(f"{server.url}/health") as resp:
            health = await resp.json()
        values = await server.metrics()
    assert health["engine"] == "continuous" and health["max_batch_size"] == 4 and health["status"] == "ok"
    assert metric(values, "inference_engine_continuous") == 1


@pytest.mark.parametrize("task", ["txt2img", "img2img", "inpaint"])
async def test_images_equal_the_request_level_engines(tiny_model: Path, task: str) -> None:
    body: dict[str, Any] = {"prompt": "a red square", "seed": 321, "n": 2, "steps": 4, "guidance": 6.0}
    if task != "txt2img":
        body.update(image=png_b64(sample_picture(32)), strength=0.75, scheduler="euler_a")
    if task == "inpaint":
        body["mask"] = png_b64(sample_picture(32, mask=True))
    out = {}
    for engine in ("dynamic", "continuous"):
        async with running_server(make_config(tiny_model, batching={"engine": engine})) as server:
            out[engine] = await server.generate(task, body)
    for i in range(2):
        a, b = pixels(out["dynamic"], i), pixels(out["continuous"], i)
        # PNG is 8-bit: float differences of ~1e-6 may flip a rounding, never more than one level.
        assert np.abs(a - b).max() <= 1
    assert [im["seed"] for im in out["continuous"]["images"]] == [321, 322]


async def test_concurrent_requests_with_different_steps_share_iterations(tiny_model: Path) -> None:
    async with running_server(make_config(tiny_model, batching=CONTINUOUS)) as server:
        bodies = [
            {"prompt": f"shape {i}", "seed": i, "steps": steps, "guidance": g, "scheduler": sched}
            for i, (steps, g, sched) in enumerate(((12, 7.5, "ddim"), (6, 3.0, "euler"), (9, 1.0, "heun")))
        ]
        # The first step's UNet is held until all three are in the engine (waiting or already in
        # the batch): on a loaded machine they could otherwise arrive one by one, each after the
        # last had finished, and share nothing.
        gate = DeviceGate(server)
        generating = asyncio.gather(*(server.generate("txt2img", b) for b in bodies))
        await gate.wait_entered()
        engine = server.app[keys.ENGINE]
        await wait_for(lambda: engine.load.queued + engine.load.running == 3)
        gate.open()
        results = await generating
        values = await server.metrics()
    # The dynamic engine would need three calls (12 + 6 + 17 model evaluations); sharing iterations
    # needs at most as many as the longest request plus the stragglers that arrived late.
    iterations = metric(values, "inference_pipeline_calls_total")
    assert iterations < 12 + 6 + 17
    assert max(r["batch_size"] for r in results) >= 2
    assert metric(values, "inference_images_total") == 3


async def test_streaming_reports_queue_start_progress_and_result(tiny_model: Path) -> None:
    async with running_server(make_config(tiny_model, batching=CONTINUOUS)) as server:
        body = {"prompt": "x", "seed": 5, "steps": 5, "stream": True}
        async with await server.post("txt2img", body) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("application/x-ndjson")
            events = [json.loads(line) for line in (await resp.text()).splitlines() if line.strip()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "queued" and "started" in kinds and kinds[-1] == "result"
    steps = [e["step"] for e in events if e["event"] == "progress"]
    assert steps == sorted(steps) and steps[-1] == 5
    assert all(e["total"] == 5 for e in events if e["event"] == "progress")
    assert len(events[-1]["images"]) == 1


async def test_a_client_that_disconnects_frees_its_slot(tiny_model: Path) -> None:
    async with running_server(
        make_config(tiny_model, batching={"engine": "continuous", "max_batch_size": 1})
    ) as server:
        # The UNet is held from the long request's first step until the server has seen its client
        # go: how many steps it runs meanwhile no longer depends on the machine's speed.
        gate = DeviceGate(server)
        body = {"prompt": "long", "seed": 1, "steps": 150, "stream": True}
        resp = await server.post("txt2img", body)
        await gate.wait_entered()
        resp.close()  # the client goes away mid-generation

        async def noticed() -> bool:
            return metric(await server.metrics(), 'inference_errors_total{kind="client_gone"}') == 1

        await wait_for(noticed)
        gate.open()
        quick = await asyncio.wait_for(
            server.generate("txt2img", {"prompt": "next", "seed": 2, "steps": 2}), 60
        )
        values = await server.metrics()
    assert len(quick["images"]) == 1
    # Not 150: the abandoned request left the batch after the step it was held in; then the next
    # request's 2.
    assert metric(values, "inference_pipeline_calls_total") == 1 + 2


async def test_a_model_the_engine_cannot_run_falls_back_to_request_level(tmp_path: Path) -> None:
    """A 9-channel inpainting UNet takes the mask as input: the continuous engine hands over."""
    import torch
    from diffusers import UNet2DConditionModel

    from inference_server.testing import build_tiny_pipeline

    pipe = build_tiny_pipeline(TinyPipelineSpec())
    config = dict(pipe.unet.config)
    config["in_channels"] = 9
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel.from_config(config)
    pipe.save_pretrained(tmp_path / "inpaint9")
    cfg = make_config(tmp_path / "inpaint9", batching=CONTINUOUS)
    cfg = cfg.replace(model={"warmup": False})  # a text-to-image warm-up can't run a 9-channel UNet
    async with running_server(cfg) as server:
        async with server.session.get(f"{server.url}/health") as resp:
            health = await resp.json()
        body = {"prompt": "x", "seed": 1, "steps": 2, "image": png_b64(sample_picture(32)),
                "mask": png_b64(sample_picture(32, mask=True)), "strength": 1.0}  # fmt: skip
        result = await server.generate("inpaint", body)
        values = await server.metrics()
    assert health["engine"] == "dynamic"
    assert metric(values, "inference_engine_continuous") == 0
    assert pixels(result).shape == (32, 32, 3)


async def test_client_priority_orders_who_joins_next(tiny_model: Path) -> None:
    async with running_server(
        make_config(tiny_model, batching={"engine": "continuous", "max_batch_size": 1})
    ) as server:
        # The one slot stays busy (its UNet held) until all four wait: were it only a long request,
        # it could end before they arrive on a loaded machine, and the first sent would go first.
        gate = DeviceGate(server)
        resp = await server.post("txt2img", {"prompt": "long", "seed": 1, "steps": 4, "stream": True})
        await gate.wait_entered()
        order: list[int] = []

        async def send(priority: int) -> None:
            await server.generate("txt2img", {"prompt": "p", "seed": 2, "steps": 2, "priority": priority})
            order.append(priority)

        # Sent in this order while the one slot is busy; they run by priority, lowest first.
        tasks = []
        for priority in (7, 3, 5, -2):
            tasks.append(asyncio.create_task(send(priority)))
            await asyncio.sleep(0.02)
        await wait_for(lambda: server.app[keys.ENGINE].queue_depth == 4)
        gate.open()
        await resp.read()
        resp.close()
        await asyncio.gather(*tasks)
        async with await server.post("txt2img", {"prompt": "p", "priority": "high"}) as bad:
            error = (await bad.json())["error"]
    assert order == [-2, 3, 5, 7]
    assert bad.status == 400 and error["field"] == "priority"
