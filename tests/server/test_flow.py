"""Streaming, backpressure, deadlines, clients that leave, OOM recovery and graceful shutdown."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from tests.server.conftest import AUTH, DeviceGate, Server, decode_png, metric, wait_for


async def read_ndjson(resp: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    assert resp.status == 200
    assert resp.content_type == "application/x-ndjson"
    return [json.loads(line) async for line in resp.content if line.strip()]


async def test_streaming_sends_progress_then_result(server: Server) -> None:
    async with await server.post(
        "txt2img", {"prompt": "a star", "seed": 5, "steps": 3, "stream": True}
    ) as resp:
        events = await read_ndjson(resp)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "queued" and events[0]["position"] == 0
    assert kinds[1] == "started" and events[1]["batch_size"] == 1
    assert [(e["step"], e["total"]) for e in events if e["event"] == "progress"] == [(1, 3), (2, 3), (3, 3)]
    assert kinds[-1] == "result"
    result = events[-1]
    assert result["images"][0]["seed"] == 5 and decode_png(result["images"][0]["png_base64"]).size == (32, 32)
    # The streamed result is the same image as the plain response.
    plain = await server.generate("txt2img", {"prompt": "a star", "seed": 5, "steps": 3})
    assert plain["images"][0]["png_base64"] == result["images"][0]["png_base64"]


async def test_streaming_by_accept_header_reports_queue_position(server: Server) -> None:
    gate = DeviceGate(server)
    first = asyncio.ensure_future(server.generate("txt2img", {"prompt": "busy", "steps": 2}))
    await gate.wait_entered()
    headers = {"Accept": "application/x-ndjson"}
    async with await server.post("txt2img", {"prompt": "queued", "steps": 2}, headers=headers) as resp:
        line = json.loads(await resp.content.readline())
        assert line == {"event": "queued", "position": 0}
        gate.open()
        rest = await read_ndjson(resp)
    assert rest[-1]["event"] == "result"
    assert (await first)["images"]


async def test_full_queue_gets_503_with_retry_after(server_factory: Any) -> None:
    async with server_factory(batching={"max_queue": 2, "max_batch_size": 1, "retry_after_s": 7}) as server:
        gate = DeviceGate(server)
        running = asyncio.ensure_future(server.generate("txt2img", {"prompt": "a", "steps": 2}))
        await gate.wait_entered()
        queued = [
            asyncio.ensure_future(server.generate("txt2img", {"prompt": f"q{i}", "steps": 2}))
            for i in range(2)
        ]

        async def queue_full() -> bool:
            return metric(await server.metrics(), "inference_queue_depth") == 2

        await wait_for(queue_full)
        async with await server.post("txt2img", {"prompt": "one too many"}) as resp:
            body = await resp.json()
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "7"
        assert body["error"]["code"] == "overloaded"
        gate.open()
        results = await asyncio.gather(running, *queued)
        assert all(len(r["images"]) == 1 for r in results)
        values = await server.metrics()
        assert metric(values, 'inference_errors_total{kind="overloaded"}') == 1
        assert metric(values, 'inference_requests_total{task="txt2img",status="503"}') == 1


async def test_deadline_passed_in_queue_gives_504_and_costs_no_compute(server: Server) -> None:
    gate = DeviceGate(server)
    running = asyncio.ensure_future(server.generate("txt2img", {"prompt": "a", "steps": 2}))
    await gate.wait_entered()
    async with await server.post("txt2img", {"prompt": "late", "steps": 3, "timeout_s": 0.3}) as resp:
        body = await resp.json()
        assert resp.status == 504
    assert body["error"]["code"] == "deadline_exceeded"
    gate.open()
    await running
    values = await server.metrics()
    assert metric(values, "inference_pipeline_calls_total") == 1  # the late request never ran
    assert metric(values, 'inference_dropped_total{reason="cancelled"}') == 1


async def test_client_that_goes_away_is_dropped_before_compute(server: Server) -> None:
    gate = DeviceGate(server)
    running = asyncio.ensure_future(server.generate("txt2img", {"prompt": "a", "steps": 2}))
    await gate.wait_entered()
    leaving = asyncio.ensure_future(server.generate("txt2img", {"prompt": "bye", "steps": 3}))

    async def queued() -> bool:
        return metric(await server.metrics(), "inference_queue_depth") == 1

    await wait_for(queued)
    leaving.cancel()  # closes the client's connection mid-request
    with pytest.raises(asyncio.CancelledError):
        await leaving
    # The handler notices the closed connection (aiohttp cancels it, or its poll sees the transport
    # closing) and counts the client as gone: only then may the device free up, or the job could be
    # picked before its cancellation on a loaded machine.

    async def noticed() -> bool:
        return metric(await server.metrics(), 'inference_errors_total{kind="client_gone"}') == 1

    await wait_for(noticed)
    gate.open()
    await running

    async def dropped() -> bool:
        return metric(await server.metrics(), 'inference_dropped_total{reason="cancelled"}') == 1

    await wait_for(dropped)
    assert metric(await server.metrics(), "inference_pipeline_calls_total") == 1


async def test_oom_splits_the_batch_and_fails_only_the_request_too_big_alone(server_factory: Any) -> None:
    import torch

    async with server_factory(batching={"max_wait_ms": 800.0}) as server:
        from inference_server import keys

        unet = server.app[keys.ENGINE].runner.pipeline("txt2img").unet

        def fake_oom(module: Any, args: Any) -> None:
            # With guidance, the UNet sees 2 latents per image: more than one image "doesn't fit".
            if args[0].shape[0] > 2:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")

        handle = unet.register_forward_pre_hook(fake_oom)
        try:
            small = [server.generate("txt2img", {"prompt": f"p{i}", "seed": i, "steps": 2}) for i in range(3)]

            async def too_big() -> tuple[int, dict[str, Any]]:
                async with await server.post("txt2img", {"prompt": "two", "n": 2, "steps": 2}) as resp:
                    return resp.status, await resp.json()

            *results, (status, body) = await asyncio.gather(*small, too_big())
        finally:
            handle.remove()
        assert [r["batch_size"] for r in results] == [1, 1, 1]
        assert status == 500 and body["error"]["code"] == "out_of_memory"
        # The server keeps serving afterwards.
        assert (await server.generate("txt2img", {"prompt": "after", "n": 2}))["batch_size"] == 2


async def test_graceful_shutdown_finishes_in_flight_and_queued_requests(server_factory: Any) -> None:
    async with server_factory(batching={"max_batch_size": 1}) as server:
        gate = DeviceGate(server)
        running = asyncio.ensure_future(server.generate("txt2img", {"prompt": "a", "steps": 2}))
        await gate.wait_entered()
        queued = asyncio.ensure_future(server.generate("txt2img", {"prompt": "b", "steps": 2}))

        async def is_queued() -> bool:
            return metric(await server.metrics(), "inference_queue_depth") == 1

        await wait_for(is_queued)
        shutdown = asyncio.ensure_future(server.runner.cleanup())

        # The listening socket closes (however long the stop takes to get there): new clients are
        # refused while old ones finish (the gate still holds the one running).
        async def refused() -> bool:
            try:
                async with aiohttp.ClientSession() as fresh, fresh.get(f"{server.url}/health", headers=AUTH):
                    return False
            except aiohttp.ClientConnectionError:
                return True

        await wait_for(refused)
        assert not running.done() and not queued.done()
        gate.open()
        first, second = await asyncio.gather(running, queued)
        await shutdown
    assert len(first["images"]) == 1 and len(second["images"]) == 1


async def test_stream_reports_a_deadline_as_an_error_event(server: Server) -> None:
    gate = DeviceGate(server)
    running = asyncio.ensure_future(server.generate("txt2img", {"prompt": "busy", "steps": 2}))
    await gate.wait_entered()
    body = {"prompt": "late", "steps": 2, "stream": True, "timeout_s": 0.3}
    async with await server.post("txt2img", body) as resp:
        events = await read_ndjson(resp)
    gate.open()
    await running
    assert events[0]["event"] == "queued"
    assert events[-1] == {
        "event": "error",
        "error": {"code": "deadline_exceeded", "message": events[-1]["error"]["message"], "field": None},
    }


async def test_load_is_reported_in_health_and_on_every_response(server_factory: Any) -> None:
    async with server_factory(batching={"max_queue": 2, "max_batch_size": 1}) as server:
        async with server.session.get(f"{server.url}/health") as resp:
            idle = await resp.json()
            assert (resp.headers["X-Queue-Depth"], resp.headers["X-Running"]) == ("0", "0")
            assert resp.headers["X-Max-Batch"] == "1"
        assert idle["load"] == {"queued": 0, "running": 0, "max_batch_size": 1}
        gate = DeviceGate(server)
        running = asyncio.ensure_future(server.generate("txt2img", {"prompt": "a", "steps": 2}))
        await gate.wait_entered()
        queued = [
            asyncio.ensure_future(server.generate("txt2img", {"prompt": f"q{i}", "steps": 2}))
            for i in range(2)
        ]

        async def queue_full() -> bool:
            return metric(await server.metrics(), "inference_queue_depth") == 2

        await wait_for(queue_full)
        async with server.session.get(f"{server.url}/health") as resp:
            busy = await resp.json()
        assert busy["load"] == {"queued": 2, "running": 1, "max_batch_size": 1}
        # Errors carry it too: a refused request tells the router how full this server is.
        async with await server.post("txt2img", {"prompt": "one too many"}) as resp:
            assert resp.status == 503
            assert (resp.headers["X-Queue-Depth"], resp.headers["X-Running"]) == ("2", "1")
        gate.open()
        await asyncio.gather(running, *queued)
