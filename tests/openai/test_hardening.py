"""Hostile input on the OpenAI-compatible routes (the native routes' counterparts are in
tests/server/test_hardening.py): 4xx in OpenAI's error shape naming the param, never a 500, and
image links that no client can point elsewhere."""

from __future__ import annotations

import base64
import io
import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from PIL import Image

from tests.server.conftest import AUTH, Server
from tests.server.rawhttp import exchange, http_request

HUGE = "1" + "0" * 400
PAST_DIGIT_LIMIT = "9" * 5000
GENERATIONS = "/v1/images/generations"


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


SOURCE = png(Image.new("RGB", (32, 32), (10, 200, 10)))


async def post_json(server: Server, path: str, raw: str) -> tuple[int, dict[str, Any]]:
    headers = {**AUTH, "Content-Type": "application/json"}
    async with server.session.post(f"{server.url}{path}", data=raw.encode(), headers=headers) as resp:
        return resp.status, await resp.json()


def openai_error(payload: dict[str, Any]) -> tuple[str, str | None]:
    return payload["error"]["type"], payload["error"]["param"]


async def test_numbers_nesting_and_text_beyond_limits_are_400s(server: Server) -> None:
    image_b64 = base64.b64encode(SOURCE).decode()
    cases = [
        (GENERATIONS, f'{{"prompt": "x", "guidance": {HUGE}}}', "guidance"),
        (GENERATIONS, f'{{"prompt": "x", "timeout_s": {HUGE}}}', "timeout_s"),
        (GENERATIONS, f'{{"prompt": "x", "n": {HUGE}}}', "n"),
        (GENERATIONS, f'{{"prompt": "x", "output_compression": {HUGE}}}', "output_compression"),
        (GENERATIONS, f'{{"prompt": "x", "n": {PAST_DIGIT_LIMIT}}}', None),
        (GENERATIONS, '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", None),
        (GENERATIONS, '{"prompt": "\\ud800 a cat"}', "prompt"),
        (GENERATIONS, '{"prompt": "a cat", "negative_prompt": "\\udc80"}', "negative_prompt"),
        (GENERATIONS, '{"prompt": "a", "n": 1, "prompt": "b"}', "prompt"),
        ("/v1/images/edits", f'{{"prompt": "\\udbff", "image": "{image_b64}"}}', "prompt"),
        ("/v1/images/variations", f'{{"prompt": "\\ud800", "image": "{image_b64}"}}', "prompt"),
        ("/v1/images/variations", f'{{"image": "{image_b64}", "strength": {HUGE}}}', "strength"),
    ]
    for path, raw, param in cases:
        status, payload = await post_json(server, path, raw)
        assert (status, *openai_error(payload)) == (400, "invalid_request_error", param), (
            path,
            raw[:60],
            payload,
        )
        assert len(payload["error"]["message"]) < 200
    form = aiohttp.FormData()
    form.add_field("image", SOURCE, filename="a.png", content_type="image/png")
    form.add_field("prompt", "x")
    form.add_field("n", PAST_DIGIT_LIMIT)
    async with server.session.post(f"{server.url}/v1/images/edits", data=form, headers=AUTH) as resp:
        payload = await resp.json()
        assert (resp.status, *openai_error(payload)) == (400, "invalid_request_error", "n"), payload


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ([("image", SOURCE), ("image", SOURCE)], "image"),
        ([("image[]", SOURCE), ("image[]", SOURCE)], "image[]"),
        ([("image", SOURCE), ("mask", SOURCE), ("mask", SOURCE)], "mask"),
        ([("image", SOURCE), ("size", "32x32"), ("size", "64x64")], "size"),
    ],
)
async def test_a_field_given_twice_on_edits_is_refused_naming_it(
    server: Server, fields: list[tuple[str, Any]], param: str
) -> None:
    form = aiohttp.FormData()
    form.add_field("prompt", "x")
    for name, value in fields:
        if isinstance(value, bytes):
            form.add_field(name, value, filename="a.png", content_type="image/png")
        else:
            form.add_field(name, value)
    async with server.session.post(f"{server.url}/v1/images/edits", data=form, headers=AUTH) as resp:
        payload = await resp.json()
        assert (resp.status, *openai_error(payload)) == (400, "invalid_request_error", param), payload
        assert "more than once" in payload["error"]["message"]


async def test_links_never_take_their_origin_from_the_host_header(server: Server) -> None:
    body = json.dumps({"prompt": "x", "size": "32x32", "response_format": "url"}).encode()
    headers = {**AUTH, "Content-Type": "application/json"}
    for version, extra in (("1.1", {"Host": "evil.example:666"}), ("1.0", {})):  # 1.0: no Host at all
        resp = await exchange(
            server.url,
            http_request("POST", GENERATIONS, headers={**headers, **extra}, body=body, version=version),
        )
        assert resp.status == 200, resp.body
        url = resp.json()["data"][0]["url"]
        assert url.startswith(f"{server.url}/images/files/"), url
        async with server.session.get(url) as image:
            assert image.status == 200


async def test_without_a_known_address_url_responses_are_refused(server: Server, tmp_path: Path) -> None:
    """On a Unix socket the server can't know what address clients use: without public_url it says
    so (before any compute) instead of handing out a broken link."""
    socket_path = str(tmp_path / "s.sock")
    site = web.UnixSite(server.runner, socket_path)
    await site.start()
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=socket_path)) as unix:
        request = {"prompt": "x", "size": "32x32", "response_format": "url"}
        async with unix.post(f"http://localhost{GENERATIONS}", json=request, headers=AUTH) as resp:
            payload = await resp.json()
            assert (resp.status, *openai_error(payload)) == (400, "invalid_request_error", "response_format")
            assert "public_url" in payload["error"]["message"]
        async with unix.post(f"http://localhost{GENERATIONS}", json={**request, "response_format": "b64_json"},
                             headers=AUTH) as resp:  # fmt: skip
            assert resp.status == 200


async def test_an_error_after_the_event_stream_started_ends_it_with_an_error_event(
    server: Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import inference_server.openai_api as openai_api

    def broken_encode(img: Any, options: Any) -> bytes:
        raise RuntimeError("encoder exploded")

    monkeypatch.setattr(openai_api, "encode_image", broken_encode)
    with caplog.at_level(logging.ERROR):
        request = {"prompt": "x", "size": "32x32", "stream": True}
        async with server.session.post(f"{server.url}{GENERATIONS}", json=request, headers=AUTH) as resp:
            assert resp.status == 200
            text = await resp.text()
    assert text.rstrip().endswith('"code": "internal"}}') and "event: error" in text
    assert "exploded" not in text and "encoder exploded" in caplog.text
    monkeypatch.undo()
    async with server.session.post(f"{server.url}{GENERATIONS}", json={"prompt": "x"}, headers=AUTH) as resp:
        assert resp.status == 200
