"""The fake backend honours the protocol: real PNGs, determinism, events, validation, injected faults."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from bot.backends.base import (
    BackendEvent,
    BackendRejected,
    BackendUnavailable,
    GenerationParams,
    InferenceBackend,
    UnsupportedTask,
)
from bot.backends.fake import FakeBackend, colour_for


def png(size=(64, 64), colour=(10, 20, 30), mode="RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, colour).save(out, format="PNG")
    return out.getvalue()


async def test_returns_real_pngs_in_seed_order_and_is_deterministic():
    backend = FakeBackend()
    assert isinstance(backend, InferenceBackend)
    params = GenerationParams("txt2img", "a red fox", seeds=(7, 8, 9), width=64, height=48, steps=3)
    first = await backend.generate(params)
    second = await backend.generate(params)
    assert [i.seed for i in first] == [7, 8, 9]
    assert [i.png for i in first] == [i.png for i in second]
    assert len({i.png for i in first}) == 3  # a different seed gives a different image
    img = Image.open(io.BytesIO(first[0].png))
    assert img.format == "PNG" and img.size == (64, 48)
    # The bottom-right corner is background: the colour derived from prompt and seed.
    assert img.convert("RGB").getpixel((63, 47)) == colour_for(params, 7)


async def test_emits_queued_started_and_progress_events():
    events: list[BackendEvent] = []

    async def on_event(e: BackendEvent) -> None:
        events.append(e)

    await FakeBackend().generate(GenerationParams("txt2img", "x", steps=4), on_event)
    assert [e.kind for e in events] == ["queued", "started"] + ["progress"] * 4
    assert events[0].position == 0
    assert [(e.step, e.total) for e in events[2:]] == [(1, 4), (2, 4), (3, 4), (4, 4)]


async def test_concurrency_cap_reports_real_queue_positions():
    backend = FakeBackend(concurrency=1)
    backend.hold()
    seen: dict[str, list[BackendEvent]] = {"a": [], "b": [], "c": []}

    def recorder(key):
        async def on_event(e):
            seen[key].append(e)

        return on_event

    tasks = [
        asyncio.create_task(backend.generate(GenerationParams("txt2img", key, steps=1), recorder(key)))
        for key in ("a", "b", "c")
    ]
    for _ in range(20):
        await asyncio.sleep(0)
    assert backend.in_flight == 3
    assert [e.position for e in seen["a"] if e.kind == "queued"] == [0]
    assert [e.position for e in seen["b"] if e.kind == "queued"] == [1]
    assert [e.position for e in seen["c"] if e.kind == "queued"] == [2]
    assert not any(e.kind == "started" for e in seen["b"] + seen["c"])
    backend.release()
    results = await asyncio.gather(*tasks)
    assert all(len(r) == 1 for r in results)
    assert [c.outcome for c in backend.calls] == ["ok", "ok", "ok"]


async def test_fail_next_injects_errors_then_recovers():
    backend = FakeBackend()
    backend.fail_next(2)
    params = GenerationParams("txt2img", "x", steps=1)
    for _ in range(2):
        with pytest.raises(BackendUnavailable) as info:
            await backend.generate(params)
        assert info.value.retryable
    assert len(await backend.generate(params)) == 1
    assert [c.outcome for c in backend.calls] == ["failed", "failed", "ok"]

    backend.fail_next(1, BackendRejected("nsfw", "prompt"))
    with pytest.raises(BackendRejected) as info:
        await backend.generate(params)
    assert info.value.field == "prompt" and not info.value.retryable


async def test_validates_like_the_server():
    backend = FakeBackend()
    cases = [
        (GenerationParams("txt2img", "   "), "prompt"),
        (GenerationParams("txt2img", "x", width=65), "width"),
        (GenerationParams("txt2img", "x" * 1001), "prompt"),
        (GenerationParams("txt2img", "x", height=2048), "height"),
        (GenerationParams("txt2img", "x", seeds=(1, 2, 3, 4, 5)), "n"),
        (GenerationParams("txt2img", "x", steps=0), "steps"),
        (GenerationParams("img2img", "x"), "image"),
        (GenerationParams("img2img", "x", image=b"not an image"), "image"),
        (GenerationParams("inpaint", "x", image=png(), mask=png((32, 32))), "mask"),
    ]
    for params, field in cases:
        with pytest.raises(BackendRejected) as info:
            await backend.generate(params)
        assert info.value.field == field, (params, info.value.message)


async def test_img2img_and_inpaint_use_the_input_image():
    backend = FakeBackend()
    source = png(colour=(0, 255, 0))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # repaint the left half only
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    params = GenerationParams("inpaint", "sky", seeds=(3,), image=source, mask=buf.getvalue(), steps=1)
    [out] = await backend.generate(params)
    img = Image.open(io.BytesIO(out.png)).convert("RGB")
    assert img.getpixel((60, 60)) == (0, 255, 0)  # kept
    assert img.getpixel((20, 60)) == colour_for(params, 3)  # repainted

    [var] = await backend.generate(GenerationParams("img2img", "sky", image=source, strength=0.5, steps=1))
    assert Image.open(io.BytesIO(var.png)).convert("RGB").getpixel((60, 60)) != (0, 255, 0)


async def test_unsupported_task_and_close():
    backend = FakeBackend(tasks=("txt2img",))
    with pytest.raises(UnsupportedTask):
        await backend.generate(GenerationParams("img2img", "x", image=png()))
    await backend.close()
    with pytest.raises(BackendUnavailable):
        await backend.generate(GenerationParams("txt2img", "x"))


async def test_cancellation_is_logged_and_frees_the_slot():
    backend = FakeBackend(concurrency=1)
    backend.hold()
    task = asyncio.create_task(backend.generate(GenerationParams("txt2img", "x", steps=1)))
    for _ in range(5):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    backend.release()
    assert len(await backend.generate(GenerationParams("txt2img", "y", steps=1))) == 1
    assert [c.outcome for c in backend.calls] == ["cancelled", "ok"]
    assert backend.in_flight == 0
