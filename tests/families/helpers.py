"""Helpers of the family tests: pictures to upload, and a gate that holds the device busy."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
from PIL import Image

from inference_server import keys
from tests.server.conftest import Server, png_b64


def picture(width: int, height: int, mask: bool = False) -> str:
    if mask:
        img = Image.new("L", (width, height), 0)
        img.paste(255, (0, 0, width // 2, height))
        return png_b64(img)
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return png_b64(Image.fromarray(pixels))


class DenoiserGate:
    """Holds the pipeline inside its denoiser (UNet or transformer) until released."""

    def __init__(self, server: Server) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        pipe = server.app[keys.ENGINE].runner.pipeline("txt2img")
        denoiser = getattr(pipe, "transformer", None) or pipe.unet

        def hook(module: Any, args: Any) -> None:
            self.entered.set()
            self.release.wait(timeout=30)  # bounded, so a failing test can't hang the suite

        self.handle = denoiser.register_forward_pre_hook(hook)

    def open(self) -> None:
        self.release.set()
        self.handle.remove()


async def wait_queued(server: Server, depth: int) -> None:
    """Wait until `depth` requests wait in the engine's queue."""
    for _ in range(500):
        if server.app[keys.ENGINE].queue_depth == depth:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never {depth} requests queued")
