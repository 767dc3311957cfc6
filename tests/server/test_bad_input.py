"""Every class of bad input gets a 4xx JSON error naming the field; the server keeps serving."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from typing import Any

import aiohttp
from PIL import Image

from tests.server.conftest import AUTH, Server, metric, png_b64

RED = Image.new("RGB", (32, 32), (255, 0, 0))


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge image: a decompression bomb in miniature."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def gif_b64() -> str:
    buf = io.BytesIO()
    RED.save(buf, format="GIF")
    return b64(buf.getvalue())


# (task, body, status, code, field)
CASES: list[tuple[str, Any, int, str, str | None]] = [
    ("txt2img", {}, 400, "invalid_request", "prompt"),
    ("txt2img", {"prompt": ""}, 400, "invalid_request", "prompt"),
    ("txt2img", {"prompt": "   "}, 400, "invalid_request", "prompt"),
    ("txt2img", {"prompt": "x" * 1001}, 400, "invalid_request", "prompt"),
    ("txt2img", {"prompt": 42}, 400, "invalid_request", "prompt"),
    ("txt2img", {"prompt": "x", "negative_prompt": ["a"]}, 400, "invalid_request", "negative_prompt"),
    ("txt2img", {"prompt": "x", "width": 33}, 400, "invalid_request", "width"),
    ("txt2img", {"prompt": "x", "height": 4096}, 400, "invalid_request", "height"),
    ("txt2img", {"prompt": "x", "width": 0}, 400, "invalid_request", "width"),
    ("txt2img", {"prompt": "x", "width": "64"}, 400, "invalid_request", "width"),
    ("txt2img", {"prompt": "x", "width": 32.5}, 400, "invalid_request", "width"),
    ("txt2img", {"prompt": "x", "steps": 0}, 400, "invalid_request", "steps"),
    ("txt2img", {"prompt": "x", "steps": 151}, 400, "invalid_request", "steps"),
    ("txt2img", {"prompt": "x", "steps": True}, 400, "invalid_request", "steps"),
    ("txt2img", {"prompt": "x", "guidance": 31}, 400, "invalid_request", "guidance"),
    ("txt2img", {"prompt": "x", "guidance": -1}, 400, "invalid_request", "guidance"),
    ("txt2img", {"prompt": "x", "guidance": "high"}, 400, "invalid_request", "guidance"),
    ("txt2img", {"prompt": "x", "n": 5}, 400, "invalid_request", "n"),
    ("txt2img", {"prompt": "x", "n": 0}, 400, "invalid_request", "n"),
    ("txt2img", {"prompt": "x", "seed": -1}, 400, "invalid_request", "seed"),
    ("txt2img", {"prompt": "x", "seed": 2**32}, 400, "invalid_request", "seed"),
    ("txt2img", {"prompt": "x", "n": 2, "seeds": [1]}, 400, "invalid_request", "seeds"),
    ("txt2img", {"prompt": "x", "seeds": [1, "2"]}, 400, "invalid_request", "seeds"),
    ("txt2img", {"prompt": "x", "seed": 1, "seeds": [1]}, 400, "invalid_request", "seeds"),
    ("txt2img", {"prompt": "x", "scheduler": "magic"}, 400, "invalid_request", "scheduler"),
    ("txt2img", {"prompt": "x", "stream": "yes"}, 400, "invalid_request", "stream"),
    ("txt2img", {"prompt": "x", "timeout_s": 0}, 400, "invalid_request", "timeout_s"),
    ("txt2img", {"prompt": "x", "colour": "red"}, 400, "invalid_request", "colour"),
    ("txt2img", {"prompt": "x", "image": png_b64(RED)}, 400, "invalid_request", "image"),
    ("txt2img", ["not", "an", "object"], 400, "invalid_request", None),
    ("img2img", {"prompt": "x"}, 400, "invalid_request", "image"),
    ("img2img", {"prompt": "x", "image": "%%% not base64 %%%"}, 400, "invalid_request", "image"),
    ("img2img", {"prompt": "x", "image": b64(b"definitely not an image")}, 400, "invalid_request", "image"),
    (
        "img2img",
        {"prompt": "x", "image": b64(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)},
        400,
        "invalid_request",
        "image",
    ),
    ("img2img", {"prompt": "x", "image": gif_b64()}, 415, "unsupported_media_type", "image"),
    (
        "img2img",
        {"prompt": "x", "image": b64(png_claiming_size(100_000, 100_000))},
        413,
        "payload_too_large",
        "image",
    ),
    (
        "img2img",
        {"prompt": "x", "image": b64(png_claiming_size(5000, 5000))},
        413,
        "payload_too_large",
        "image",
    ),
    (
        "img2img",
        {"prompt": "x", "image": png_b64(Image.new("RGB", (33, 32)))},
        400,
        "invalid_request",
        "image",
    ),
    ("img2img", {"prompt": "x", "image": png_b64(RED), "strength": 0}, 400, "invalid_request", "strength"),
    ("img2img", {"prompt": "x", "image": png_b64(RED), "strength": 1.5}, 400, "invalid_request", "strength"),
    (
        "img2img",
        {"prompt": "x", "image": png_b64(RED), "steps": 2, "strength": 0.2},
        400,
        "invalid_request",
        "strength",
    ),
    ("inpaint", {"prompt": "x", "image": png_b64(RED)}, 400, "invalid_request", "mask"),
    (
        "inpaint",
        {"prompt": "x", "image": png_b64(RED), "mask": png_b64(Image.new("L", (16, 16)))},
        400,
        "invalid_request",
        "mask",
    ),
    ("inpaint", {"prompt": "x", "image": png_b64(RED), "mask": b64(b"junk")}, 400, "invalid_request", "mask"),
]


async def test_every_bad_input_is_a_4xx_naming_the_field(server: Server) -> None:
    failures = []
    for task, body, status, code, field in CASES:
        async with await server.post(task, body) as resp:
            payload = await resp.json()
            got = (resp.status, payload.get("error", {}).get("code"), payload.get("error", {}).get("field"))
        if got != (status, code, field):
            failures.append(
                f"{task} {str(body)[:80]}: expected {(status, code, field)}, got {got}: {payload}"
            )
    assert not failures, "\n".join(failures)
    values = await server.metrics()
    assert metric(values, "inference_pipeline_calls_total") == 0  # nothing bad reached the model
    assert metric(values, 'inference_errors_total{kind="invalid_request"}') >= len(CASES) - 5
    # ...and the server still serves.
    assert (await server.generate("txt2img", {"prompt": "still here"}))["images"]


async def test_malformed_bodies(server: Server) -> None:
    url = f"{server.url}/v1/txt2img"
    cases = [
        ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "invalid_request"),
        ({"data": b"", "headers": {"Content-Type": "application/json"}}, 400, "invalid_request"),
        ({"data": b"\xff\xfe", "headers": {"Content-Type": "application/json"}}, 400, "invalid_request"),
        ({"data": b"prompt=x", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
    ]
    for kwargs, status, code in cases:
        async with server.session.post(url, headers={**AUTH, **kwargs.pop("headers")}, **kwargs) as resp:
            assert resp.status == status, kwargs
            assert (await resp.json())["error"]["code"] == code


async def test_body_over_the_size_limit_is_413(server_factory: Any) -> None:
    async with server_factory(server={"max_body_bytes": 4096}) as server:
        async with await server.post("txt2img", {"prompt": "x" * 5000}) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"]["code"] == "payload_too_large"
        form = aiohttp.FormData()
        form.add_field("prompt", "x")
        form.add_field("image", b"\x89PNG" + b"\0" * 8000, filename="big.png", content_type="image/png")
        async with await server.post("img2img", data=form) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"]["code"] == "payload_too_large"
        assert (await server.generate("txt2img", {"prompt": "small"}))["images"]


async def test_multipart_bad_fields_name_the_field(server: Server) -> None:
    form = aiohttp.FormData()
    form.add_field("prompt", "x")
    form.add_field("steps", "many")
    buf = io.BytesIO()
    RED.save(buf, format="PNG")
    form.add_field("image", buf.getvalue(), filename="in.png", content_type="image/png")
    async with await server.post("img2img", data=form) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["field"] == "steps"
