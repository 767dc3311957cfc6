"""Fixtures for the continuous-batching tests: one tiny random pipeline per module, one CPU thread.

One intra-op thread: on a shared 2-core machine two OpenMP threads competing with another process
make a tiny UNet call ~100x slower (spin-waiting), and the results don't depend on the thread count.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from inference_server.testing import TinyPipelineSpec, build_tiny_pipeline

# 32x32 pixels -> 16x16 latents with the tiny VAE (two blocks): the smallest size that still has a
# cross-attention block at a coarser resolution.
SIZE = 32


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipes(torch_one_thread: None) -> dict[str, Any]:
    """The tiny pipeline for each task, sharing modules (as the server builds them)."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    base = build_tiny_pipeline(TinyPipelineSpec(sample_size=SIZE))
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(base)
    inpaint = StableDiffusionInpaintPipeline.from_pipe(base)
    for p in (base, img2img, inpaint):
        p.set_progress_bar_config(disable=True)
    return {"txt2img": base, "img2img": img2img, "inpaint": inpaint}


def _engines_on(pipe: Any) -> Iterator[Any]:
    """Yield a maker of continuous engines on `pipe` (its scheduler factory by default); every
    engine it made is stopped afterwards."""
    from inference_server.continuous.core import ContinuousEngine
    from inference_server.continuous.engine import scheduler_factory

    engines = []

    def make(**kwargs: Any) -> ContinuousEngine:
        kwargs.setdefault("scheduler_factory", scheduler_factory(pipe))
        engine = ContinuousEngine(pipe, **kwargs)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


@pytest.fixture
def make_engine(pipes: dict[str, Any]) -> Iterator[Any]:
    """Start continuous engines on the shared pipeline; they are stopped after the test."""
    yield from _engines_on(pipes["inpaint"])


@pytest.fixture
def engine_of(family: tuple[Any, dict[str, Any]]) -> Iterator[Any]:
    """Continuous engines on the inpaint pipeline of the test module's `family` fixture (a name and
    the family's pipelines by task)."""
    yield from _engines_on(family[1]["inpaint"])
