"""Hostile input on the native routes, one test per class of defect: every case answers a 4xx naming
what was wrong (never a 500), one request's bad input fails that request alone, and the server keeps
serving. The OpenAI routes' counterparts are in tests/openai/test_hardening.py."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from inference_server import keys
from inference_server.app import SERVER_HEADER
from inference_server.bodies import MAX_JSON_CONTAINERS, MAX_JSON_DEPTH, json_shape_problem
from inference_server.engine import GenerationFailed, GenerationRequest
from tests.server.conftest import AUTH, TOKEN, DeviceGate, Server, png_b64
from tests.server.rawhttp import exchange, http_request, open_raw, parse_response

RED = Image.new("RGB", (32, 32), (255, 0, 0))
HUGE = "1" + "0" * 400  # an integer literal beyond the float range (1e400)
PAST_DIGIT_LIMIT = "9" * 5000  # beyond Python's 4300-digit int conversion limit


async def post_raw_json(server: Server, task: str, raw: bytes | str) -> tuple[int, dict[str, Any]]:
    data = raw.encode() if isinstance(raw, str) else raw
    headers = {**AUTH, "Content-Type": "application/json"}
    async with server.session.post(f"{server.url}/v1/{task}", data=data, headers=headers) as resp:
        return resp.status, await resp.json()


def error_of(payload: dict[str, Any]) -> tuple[str, str | None]:
    return payload["error"]["code"], payload["error"]["field"]


async def test_numbers_beyond_float_or_int_limits_are_400s_naming_the_field(server: Server) -> None:
    json_cases = [
        ("txt2img", f'{{"prompt": "x", "guidance": {HUGE}}}', "guidance"),
        ("txt2img", f'{{"prompt": "x", "timeout_s": -{HUGE}}}', "timeout_s"),
        ("img2img", f'{{"prompt": "x", "image": "{png_b64(RED)}", "strength": {HUGE}}}', "strength"),
        ("txt2img", f'{{"prompt": "x", "steps": {HUGE}}}', "steps"),
        ("txt2img", f'{{"prompt": "x", "seeds": [{HUGE}]}}', "seeds"),
        ("txt2img", '{"prompt": "x", "guidance": 1e999}', "guidance"),
        # Past Python's digit limit the JSON reader itself refuses: a 400 for the body.
        ("txt2img", f'{{"prompt": "x", "steps": {PAST_DIGIT_LIMIT}}}', None),
        ("txt2img", f'{{"prompt": "x", "guidance": {PAST_DIGIT_LIMIT}}}', None),
    ]
    for task, raw, field in json_cases:
        status, payload = await post_raw_json(server, task, raw)
        assert (status, *error_of(payload)) == (400, "invalid_request", field), (raw[:60], payload)
        assert len(payload["error"]["message"]) < 200  # the value isn't echoed back whole
    for name, value in [("steps", PAST_DIGIT_LIMIT), ("guidance", HUGE), ("seeds", PAST_DIGIT_LIMIT)]:
        form = aiohttp.FormData(default_to_multipart=True)
        form.add_field("prompt", "x")
        form.add_field(name, value)
        async with await server.post("txt2img", data=form) as resp:
            payload = await resp.json()
            assert (resp.status, *error_of(payload)) == (400, "invalid_request", name), payload
    assert (await server.generate("txt2img", {"prompt": "still serving"}))["images"]


async def test_deep_nesting_is_refused_before_parsing(server: Server) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    for raw in (deep, f'{{"prompt": "x", "seeds": {deep}}}', '{"a":' * 50_000 + "1" + "}" * 50_000):
        status, payload = await post_raw_json(server, "txt2img", raw)
        assert (status, *error_of(payload)) == (400, "invalid_request", None), payload
        assert "the JSON body" in payload["error"]["message"]  # too many containers, or too deep
    shallow_but_deep = "[" * 40 + "]" * 40  # few containers, past the depth limit
    status, payload = await post_raw_json(
        server, "txt2img", f'{{"prompt": "x", "seeds": {shallow_but_deep}}}'
    )
    assert status == 400 and "nests deeper than 32" in payload["error"]["message"], payload
    # Millions of small containers are refused unparsed too (the parser's slowest case).
    status, payload = await post_raw_json(server, "txt2img", "[" + "[]," * 100_000 + "[]]")
    assert status == 400 and f"more than {MAX_JSON_CONTAINERS}" in payload["error"]["message"], payload
    # Brackets inside strings (escaped quotes and backslashes included) don't count; nesting up to
    # the limit is only a schema error.
    for text in ("[" * 10_000, '\\"[' * 5_000, "\\" + "{" * 5_000):
        assert json_shape_problem(json.dumps({"prompt": text}).encode()) is None
    ok_depth = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert json_shape_problem(ok_depth.encode()) is None
    assert "nests deeper" in json_shape_problem(("[" + ok_depth + "]").encode())
    assert "nests deeper" in json_shape_problem(b'["\\\\", ' + ("[" + ok_depth + "]").encode() + b"]")
    seeds = "[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1)  # the body's object is one more level
    status, payload = await post_raw_json(server, "txt2img", f'{{"prompt": "x", "seeds": {seeds}}}')
    assert (status, *error_of(payload)) == (400, "invalid_request", "seeds")


async def test_bytes_that_are_not_utf8_in_authorization_are_401_on_every_v1_route(server: Server) -> None:
    routes = {
        (route.method, route.resource.canonical)
        for route in server.app.router.routes()
        if route.resource is not None
        and route.resource.canonical.startswith("/v1/")
        and route.method != "HEAD"
    }
    assert len(routes) >= 7  # the native tasks, the OpenAI routes and the model listing
    for method, path in sorted(routes):
        path = path.replace("{model}", "embedded")
        for token in (b"Bearer \xff\xfe\x80", b"\xc3\x28 \xa0\xa1", b"Bearer " + TOKEN.encode() + b"\xff"):
            resp = await exchange(server.url, http_request(method, path, headers={"Authorization": token}))
            assert resp.status == 401, (method, path, token, resp.body[:200])
            assert resp.headers["www-authenticate"] == "Bearer"


async def test_text_that_is_not_unicode_is_refused_naming_the_field(server: Server) -> None:
    for raw, field in [
        ('{"prompt": "a cat \\ud800"}', "prompt"),
        ('{"prompt": "a cat", "negative_prompt": "\\udfff dog"}', "negative_prompt"),
        ('{"prompt": "\\ude00\\ud83d"}', "prompt"),  # a pair in the wrong order is two lone halves
    ]:
        status, payload = await post_raw_json(server, "txt2img", raw)
        assert (status, *error_of(payload)) == (400, "invalid_request", field), payload
        assert "surrogate" in payload["error"]["message"]
    # A proper pair is one character (an emoji) and fine.
    status, payload = await post_raw_json(server, "txt2img", '{"prompt": "a cat \\ud83d\\ude00", "steps": 1}')
    assert status == 200, payload


def bad_input_cases() -> dict[str, tuple[GenerationRequest, GenerationRequest]]:
    """(a request whose own input fails in the pipeline, a good request of the same batch key)."""
    base = {"negative_prompt": "", "seeds": (1,), "width": 32, "height": 32, "steps": 2, "guidance": 7.5}
    txt = GenerationRequest(task="txt2img", prompt="fine", **base)
    img = GenerationRequest(task="img2img", prompt="fine", strength=0.6, image=RED, **base)
    mask = Image.new("L", (32, 32), 255)
    inpaint = GenerationRequest(task="inpaint", prompt="fine", strength=0.6, image=RED, mask=mask, **base)
    from dataclasses import replace

    # These skip the API's validation (which refuses them): they stand for any input that gets past
    # validation and still fails in the pipeline.
    return {
        "prompt": (replace(txt, prompt="a lone surrogate \ud800"), txt),
        "negative_prompt": (replace(txt, negative_prompt="\udc80"), txt),
        "image": (replace(img, image=Image.new("LA", (32, 32))), img),  # 2 channels: the VAE wants 3
        "mask": (replace(inpaint, mask=None), inpaint),
    }


@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "image", "mask"])
async def test_one_requests_bad_input_fails_that_request_alone(server: Server, field: str) -> None:
    """With request-level batching a bad member used to fail the whole pipeline call; the runner now
    retries the call's requests in halves until only the culprit fails."""
    bad, good = bad_input_cases()[field]
    engine = server.app[keys.ENGINE]
    gate = DeviceGate(server)
    holder = engine.submit(good, timeout_s=60)
    await gate.wait_entered()
    # While the device is busy these queue, then run together as one batch.
    jobs = [engine.submit(good, timeout_s=60) for _ in range(2)]
    culprit = engine.submit(bad, timeout_s=60)
    jobs += [engine.submit(good, timeout_s=60) for _ in range(2)]
    gate.open()
    await holder.wait()
    results = await asyncio.gather(*(job.wait() for job in jobs))
    assert all(len(r.images) == 1 for r in results)
    assert max(r.batch_size for r in results) >= 2  # the good ones still batched together
    with pytest.raises(GenerationFailed) as raised:
        await culprit.wait()
    assert "model failed" in raised.value.message and "Error" not in raised.value.message
    assert (await server.generate("txt2img", {"prompt": "still serving"}))["images"]


async def test_health_and_results_name_the_model_without_its_path(server: Server, tiny_model: Path) -> None:
    async with server.session.get(f"{server.url}/health") as resp:
        text = await resp.text()
        assert resp.status == 200 and (await resp.json())["model"] == tiny_model.name
    assert str(tiny_model.parent) not in text
    payload = await server.generate("txt2img", {"prompt": "x"})
    assert payload["model"] == tiny_model.name


async def test_a_field_given_twice_is_refused_naming_it(server: Server) -> None:
    status, payload = await post_raw_json(server, "txt2img", '{"prompt": "a", "steps": 2, "prompt": "b"}')
    assert (status, *error_of(payload)) == (400, "invalid_request", "prompt")
    assert "more than once" in payload["error"]["message"]
    for name, value, task in [
        ("prompt", "b", "txt2img"),
        ("steps", "3", "txt2img"),
        ("image", RED, "img2img"),
    ]:
        form = aiohttp.FormData(default_to_multipart=True)
        form.add_field("prompt", "a")
        form.add_field("steps", "2")
        image_bytes = png_bytes(RED)
        if task == "img2img":
            form.add_field("image", image_bytes, filename="a.png", content_type="image/png")
        form.add_field(name, png_bytes(value) if isinstance(value, Image.Image) else value,
                       **({"filename": "b.png", "content_type": "image/png"} if name == "image" else {}))  # fmt: skip
        async with await server.post(task, data=form) as resp:
            payload = await resp.json()
            assert (resp.status, *error_of(payload)) == (400, "invalid_request", name), payload
            assert "more than once" in payload["error"]["message"]


def png_bytes(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


async def test_stalled_headers_and_bodies_are_cut_off(server_factory: Any) -> None:
    async with server_factory(server={"header_timeout_s": 0.5, "body_timeout_s": 0.5}) as server:
        # Slowloris: a header that never ends. The server closes the connection (EOF, no answer).
        held = []
        for _ in range(20):
            reader, writer = await open_raw(server.url)
            writer.write(b"POST /v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            held.append((reader, writer))
        for reader, writer in held:
            assert await asyncio.wait_for(reader.read(), 30) == b""
            writer.close()
        # A body that never completes: 408 naming the deadline, and the connection is to close
        # (aiohttp reads what may still come for up to its lingering time, then closes).
        reader, writer = await open_raw(server.url)
        head = http_request("POST", "/v1/txt2img", headers={**AUTH, "Content-Type": "application/json",
                                                              "Content-Length": "1000", "Connection": "keep-alive"})  # fmt: skip
        writer.write(head + b'{"prompt": "x", ')
        response_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        length = int(parse_response(response_head).headers["content-length"])
        resp = parse_response(response_head + await reader.readexactly(length))
        writer.close()
        assert resp.status == 408 and resp.json()["error"]["code"] == "request_timeout"
        assert resp.headers["connection"] == "close"
        # A prompt client is unaffected.
        assert (await server.generate("txt2img", {"prompt": "x"}))["images"]


async def test_every_response_names_no_server_versions(server: Server) -> None:
    seen = []
    async with server.session.get(f"{server.url}/health") as resp:
        seen.append(resp.headers["Server"])
    async with server.session.get(f"{server.url}/no/such/route") as resp:
        assert resp.status == 404
        seen.append(resp.headers["Server"])
    async with server.session.post(f"{server.url}/v1/txt2img", json={"prompt": "x"}) as resp:
        assert resp.status == 401
        seen.append(resp.headers["Server"])
    async with await server.post("txt2img", {"prompt": ""}) as resp:
        assert resp.status == 400
        seen.append(resp.headers["Server"])
    async with await server.post("txt2img", {"prompt": "x", "stream": True}) as resp:
        await resp.read()
        seen.append(resp.headers["Server"])
    # Rejected by aiohttp's parser before any app sees it.
    for garbage in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20_000 + b"\r\n\r\n"):
        resp = await exchange(server.url, garbage)
        assert resp.status == 400
        seen.append(resp.headers["server"])
    assert seen == [SERVER_HEADER] * len(seen)


async def test_bodies_with_broken_framing_or_encoding_are_400s(server: Server) -> None:
    bad_gzip = http_request("POST", "/v1/txt2img", headers={**AUTH, "Content-Type": "application/json",
                                                             "Content-Encoding": "gzip"}, body=b"not gzip at all")  # fmt: skip
    bad_chunks = (
        http_request(
            "POST",
            "/v1/txt2img",
            headers={**AUTH, "Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        ).replace(b"Content-Length: 0\r\n", b"")  # fmt: skip
        + b"zz\r\n{}\r\n0\r\n\r\n"
    )
    for raw in (bad_gzip, bad_chunks):
        resp = await exchange(server.url, raw)
        assert resp.status == 400, resp.body
    # A proper gzip body works.
    good = gzip.compress(json.dumps({"prompt": "x", "steps": 1}).encode())
    resp = await exchange(server.url, http_request("POST", "/v1/txt2img", headers={**AUTH, "Content-Type": "application/json", "Content-Encoding": "gzip"}, body=good))  # fmt: skip
    assert resp.status == 200


async def test_an_unexpected_error_is_a_logged_500_that_names_nothing(
    server: Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    engine = server.app[keys.ENGINE]

    def broken_submit(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret detail at /srv/models/private")

    monkeypatch.setattr(engine, "submit", broken_submit)
    with caplog.at_level(logging.ERROR):
        async with await server.post("txt2img", {"prompt": "x"}) as resp:
            text = await resp.text()
            assert resp.status == 500 and json.loads(text)["error"]["code"] == "internal"
        async with await server.post("txt2img", {"prompt": "x", "stream": True}) as resp:
            text += await resp.text()
            assert resp.status == 500
    assert "secret" not in text and "RuntimeError" not in text
    assert "secret detail" in caplog.text  # ...but the log has it


async def test_an_error_after_the_stream_started_ends_it_with_an_error_event(
    server: Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import inference_server.app as app_module

    async def broken_payload(result: Any) -> Any:
        raise RuntimeError("encoder exploded")

    monkeypatch.setattr(app_module, "result_payload", broken_payload)
    with caplog.at_level(logging.ERROR):
        async with await server.post("txt2img", {"prompt": "x", "stream": True}) as resp:
            assert resp.status == 200
            events = [json.loads(line) for line in (await resp.text()).splitlines()]
    assert events[-1] == {
        "event": "error",
        "error": {"code": "internal", "message": "internal error", "field": None},
    }
    assert "encoder exploded" in caplog.text
    monkeypatch.undo()
    assert (await server.generate("txt2img", {"prompt": "still serving"}))["images"]
