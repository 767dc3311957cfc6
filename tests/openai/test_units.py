"""The pure parts: the URL image store (with a fake clock), size parsing, the transparency mask."""

from __future__ import annotations

import pytest
from PIL import Image

from inference_server.config import ServerConfig
from inference_server.errors import RequestError
from inference_server.openai_api import ImageStore, parse_size, transparent_area


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_store_expires_images_after_ttl() -> None:
    clock = Clock()
    store = ImageStore(60.0, clock=clock)
    name = store.put(b"png-bytes", "image/png", "png")
    assert name.endswith(".png") and len(name) >= 32  # 192 random bits, URL-safe
    item = store.get(name)
    assert item is not None and item.data == b"png-bytes" and item.content_type == "image/png"
    clock.now += 59.0
    assert store.get(name) is not None
    clock.now += 2.0
    assert store.get(name) is None
    assert len(store) == 0 and store.bytes == 0


def test_store_evicts_oldest_past_its_bounds() -> None:
    store = ImageStore(60.0, max_images=3, max_bytes=100, clock=Clock())
    names = [store.put(bytes(10), "image/png", "png") for _ in range(4)]
    assert store.get(names[0]) is None  # count bound: the oldest went first
    assert all(store.get(n) is not None for n in names[1:])
    big = store.put(bytes(95), "image/png", "png")
    assert [store.get(n) for n in names] == [None] * 4  # byte bound: everything older went
    assert store.get(big) is not None and store.bytes == 95
    assert len({store.put(b"x", "image/png", "png") for _ in range(50)}) == 50  # names never repeat


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("512x512", (512, 512)),
        ("64X32", (64, 32)),
        (" 256 x 128 ", (256, 128)),
        ("auto", None),
        ("AUTO", None),
    ],
)
def test_parse_size_accepts(value: str, expected: tuple[int, int] | None) -> None:
    assert parse_size(value, ServerConfig()) == expected


@pytest.mark.parametrize(
    "value", ["512", "512x", "x512", "-8x8", "12x12", "0x0", "4096x4096", "1e3x8", 512, None]
)
def test_parse_size_refuses_naming_size(value: object) -> None:
    with pytest.raises(RequestError) as raised:
        parse_size(value, ServerConfig())
    assert raised.value.status == 400 and raised.value.field == "size"


def test_transparent_area_follows_openais_convention() -> None:
    img = Image.new("RGBA", (8, 8), (10, 20, 30, 255))
    img.putpixel((1, 2), (0, 0, 0, 0))  # fully transparent: edit
    img.putpixel((3, 4), (0, 0, 0, 128))  # half transparent: keep (only alpha 0 counts)
    mask = transparent_area(img)
    assert mask is not None and mask.mode == "L"
    assert mask.getpixel((1, 2)) == 255 and mask.getpixel((3, 4)) == 0 and mask.getpixel((0, 0)) == 0
    assert transparent_area(Image.new("RGB", (8, 8))) is None  # no alpha channel at all
    palette = Image.new("P", (8, 8), 0)
    palette.info["transparency"] = 0  # a palette PNG whose colour 0 is transparent
    assert transparent_area(palette).getpixel((0, 0)) == 255


def test_config_keys_are_validated_by_name() -> None:
    from inference_server.config import load_config
    from inference_server.config_loader import ConfigError

    config = load_config(
        {"inference_server": {"openai_url_ttl_s": 60.0, "public_url": "https://img.example"}}
    )
    assert config.server.openai_url_ttl_s == 60.0
    with pytest.raises(ConfigError, match="public_url"):
        load_config({"inference_server": {"public_url": "img.example"}})
    with pytest.raises(ConfigError, match="openai_url_ttl_s"):
        load_config({"inference_server": {"openai_url_ttl_s": 0.0}})
    # Environment overrides work as for every key.
    env = {"IMAGINE_INFERENCE_SERVER_OPENAI_URL_TTL_S": "5"}
    assert load_config({}, environ=env).server.openai_url_ttl_s == 5.0
