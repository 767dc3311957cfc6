"""The official `openai` client against the server: generations, edits, variations, models, URLs."""

from __future__ import annotations

import base64
import io
from typing import Any

import aiohttp
import numpy as np
import openai
import pytest
from PIL import Image

from tests.openai.conftest import client_for
from tests.server.conftest import Server, decode_png

BLUE = (30, 60, 200)


def decode(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


async def test_generate_b64_json(client: openai.AsyncOpenAI) -> None:
    result = await client.images.generate(
        model="dall-e-3", prompt="a red circle", n=2, size="32x32", response_format="b64_json", user="alice"
    )
    assert result.created > 0
    assert result.size == "32x32" and result.output_format == "png"
    assert len(result.data) == 2
    images = [decode(item.b64_json) for item in result.data]
    assert all(img.format == "PNG" and img.size == (32, 32) for img in images)
    assert np.asarray(images[0]).std() > 0  # a real picture, not a blank
    assert all(item.url is None for item in result.data)


async def test_generate_defaults_to_b64_and_model_size(client: openai.AsyncOpenAI) -> None:
    result = await client.images.generate(prompt="a cat")
    assert len(result.data) == 1
    # The model's default size ([model] width/height = 32 in the test config).
    assert decode(result.data[0].b64_json).size == (32, 32)


async def test_generate_url_is_served_without_token(client: openai.AsyncOpenAI, server: Server) -> None:
    result = await client.images.generate(prompt="a cat", size="32x32", response_format="url")
    url = result.data[0].url
    assert url is not None and url.startswith(f"{server.url}/images/files/") and url.endswith(".png")
    assert result.data[0].b64_json is None
    # Tools download the URL with a plain GET, as with OpenAI's pre-signed URLs: no bearer token.
    async with aiohttp.ClientSession() as plain, plain.get(url) as resp:
        assert resp.status == 200
        assert resp.content_type == "image/png"
        assert "max-age=" in resp.headers["Cache-Control"]
        assert Image.open(io.BytesIO(await resp.read())).size == (32, 32)
        # A guessed name finds nothing.
        async with plain.get(f"{server.url}/images/files/not-a-real-name.png") as missing:
            assert missing.status == 404


async def test_public_url_prefixes_image_urls(server_factory: Any) -> None:
    async with (
        server_factory(server={"public_url": "https://images.example.com/"}) as server,
        client_for(server) as client,
    ):
        result = await client.images.generate(prompt="a cat", response_format="url")
        url = result.data[0].url
        assert url.startswith("https://images.example.com/images/files/")
        # The same name is served here (a reverse proxy forwards /images/files/ to this server).
        async with server.session.get(f"{server.url}/images/files/{url.rsplit('/', 1)[1]}") as resp:
            assert resp.status == 200


async def test_legacy_dalle2_defaults_to_url(client: openai.AsyncOpenAI) -> None:
    result = await client.images.generate(model="dall-e-2", prompt="a cat", size="32x32")
    assert result.data[0].url is not None and result.data[0].b64_json is None


async def test_output_formats(client: openai.AsyncOpenAI) -> None:
    jpeg = await client.images.generate(
        prompt="a cat", size="32x32", output_format="jpeg", output_compression=80
    )
    assert jpeg.output_format == "jpeg"
    assert decode(jpeg.data[0].b64_json).format == "JPEG"
    webp = await client.images.generate(
        prompt="a cat", size="32x32", output_format="webp", response_format="url"
    )
    assert webp.data[0].url.endswith(".webp")
    async with aiohttp.ClientSession() as plain, plain.get(webp.data[0].url) as resp:
        assert resp.content_type == "image/webp"
        assert Image.open(io.BytesIO(await resp.read())).format == "WEBP"


async def test_same_engine_as_native_api(client: openai.AsyncOpenAI, server: Server) -> None:
    """Native fields pass as extensions; the same seed gives the native API's exact image."""
    extras = {"seed": 1234, "steps": 2, "negative_prompt": "blurry"}
    result = await client.images.generate(prompt="a lighthouse", size="32x32", extra_body=extras)
    native = await server.generate("txt2img", {"prompt": "a lighthouse", "width": 32, "height": 32, **extras})
    ours = np.asarray(decode(result.data[0].b64_json))
    theirs = np.asarray(decode_png(native["images"][0]["png_base64"]))
    assert (ours == theirs).all()


async def test_models(client: openai.AsyncOpenAI, server: Server) -> None:
    models = await client.models.list()
    ids = [m.id for m in models.data]
    assert ids == ["pipe"]  # the tiny model's folder name, not its file-system path
    model = await client.models.retrieve("pipe")
    assert model.id == "pipe" and model.owned_by == "imagine"
    try:
        await client.models.retrieve("dall-e-3")
    except openai.NotFoundError as e:
        assert e.code == "model_not_found"
    else:
        raise AssertionError("an unknown model must be 404")


async def test_edit_with_mask_repaints_only_transparent_pixels(client: openai.AsyncOpenAI) -> None:
    source = Image.new("RGB", (32, 32), BLUE)
    mask = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (8, 8, 24, 24))  # OpenAI: fully transparent = edit here
    result = await client.images.edit(
        image=("source.png", png_bytes(source), "image/png"),
        mask=("mask.png", png_bytes(mask), "image/png"),
        prompt="a yellow star",
        n=2,
        extra_body={"seed": 5, "steps": 4},
    )
    assert len(result.data) == 2
    out = np.asarray(decode(result.data[0].b64_json).convert("RGB")).astype(int)
    keep = np.asarray(mask.getchannel("A")) == 255
    assert (out[keep] == np.array(BLUE)).all()  # opaque mask pixels: the source, untouched
    assert np.abs(out[~keep] - np.array(BLUE)).max() > 0  # the transparent square was repainted


async def test_edit_transparent_image_without_mask(client: openai.AsyncOpenAI) -> None:
    source = Image.new("RGBA", (32, 32), (*BLUE, 255))
    source.paste((0, 0, 0, 0), (0, 0, 16, 32))  # the left half is transparent: repaint it
    result = await client.images.edit(
        image=("source.png", png_bytes(source), "image/png"),
        prompt="a tree",
        size="32x32",
        extra_body={"seed": 2},
    )
    out = np.asarray(decode(result.data[0].b64_json).convert("RGB")).astype(int)
    assert (out[:, 16:] == np.array(BLUE)).all()
    assert np.abs(out[:, :16] - np.array(BLUE)).max() > 0


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
async def test_edit_opaque_image_without_mask_edits_whole_image(
    client: openai.AsyncOpenAI, mode: str
) -> None:
    # RGBA screenshots are usually fully opaque: no transparent pixel means "edit the whole image".
    source = Image.new(mode, (32, 32), BLUE if mode == "RGB" else (*BLUE, 255))
    result = await client.images.edit(image=("s.png", png_bytes(source), "image/png"), prompt="a tree")
    out = np.asarray(decode(result.data[0].b64_json).convert("RGB")).astype(int)
    assert out.shape == (32, 32, 3)
    assert np.abs(out - np.array(BLUE)).max() > 0  # image-to-image: every pixel may change


async def test_variation(client: openai.AsyncOpenAI) -> None:
    source = Image.new("RGB", (40, 40), (200, 30, 30))
    result = await client.images.create_variation(
        image=("s.png", png_bytes(source), "image/png"), n=2, size="32x32", response_format="b64_json"
    )
    assert result.size == "32x32"
    images = [decode(item.b64_json) for item in result.data]
    assert [img.size for img in images] == [(32, 32), (32, 32)]
    assert not (np.asarray(images[0]) == np.asarray(images[1])).all()  # different seeds, different images


async def test_openapi_documents_every_openai_route(server: Server) -> None:
    async with server.session.get(f"{server.url}/openapi.yaml") as resp:
        text = await resp.text()
    routes = {
        r.resource.canonical
        for r in server.app.router.routes()
        if r.resource is not None
        and r.resource.canonical.startswith(("/v1/images", "/v1/models", "/images/"))
    }
    assert routes == {
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/images/variations",
        "/v1/models",
        "/v1/models/{model}",
        "/images/files/{name}",
    }
    # Path keys of the `paths:` mapping (no YAML parser needed: they are two-space-indented keys).
    assert all(f"\n  {route}:\n" in text for route in routes)
