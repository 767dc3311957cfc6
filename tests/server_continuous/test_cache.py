"""Step caching in the continuous engine: each image keeps its own cache state.

Per family (a tiny SD UNet, SDXL, a 3-block SD 3 and FLUX dev with true CFG), requests at every
level and uncached share iterations, one joining while the others run, and each image equals the
request-level engine's image at its level for its seed (diffusers' pipeline for a batch of one
under `step_cache`, which is what that engine runs) within the engines' parity tolerance; uncached
images stay diffusers' own. Caches really skip work (counters), a sample's cache is dropped when it
finishes or is cancelled, and a failed call (retried at a smaller batch) changes no cache.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import numpy as np
import pytest
import torch

from inference_server.continuous.core import ContinuousRequest, RequestCancelled
from inference_server.continuous.engine import scheduler_factory
from inference_server.step_cache import LEVELS, step_cache, unet_full_step
from tests.server_continuous.conftest import SIZE
from tests.server_continuous.family_parity import FAMILY_SIZE, family_pipes
from tests.server_continuous.parity import reference

# As the parity tests: the same computation batched differently differs by float rounding (~1e-6
# here, cached or not). Caching itself moves every cached image here by more than this (asserted),
# so a wrong reuse (another sample's features, a stale residual, a step off in the schedule) can't
# hide under it.
TOLERANCE = 1e-4
STEPS = 8
FAMILIES = ("sd", "sdxl", "sd3", "flux_dev")


def tiny_pipes(name: str) -> dict[str, Any]:
    """The tiny pipelines of a family for each task; SD 3 with three blocks (the shipped tiny one
    has one, which leaves the first-block cache nothing to skip)."""
    if name == "sd":
        from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

        from inference_server.testing import TinyPipelineSpec, build_tiny_pipeline

        base = build_tiny_pipeline(TinyPipelineSpec(sample_size=SIZE))
        pipes = {
            "txt2img": base,
            "img2img": StableDiffusionImg2ImgPipeline.from_pipe(base),
            "inpaint": StableDiffusionInpaintPipeline.from_pipe(base),
        }
    elif name == "sd3":
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, SD3Transformer2DModel

        from inference_server.tiny_families import build_tiny_family

        base = build_tiny_family("sd3")
        torch.manual_seed(0)
        deeper = SD3Transformer2DModel.from_config({**base.transformer.config, "num_layers": 3})
        base.register_modules(transformer=deeper.eval())
        pipes = {
            "txt2img": base,
            "img2img": AutoPipelineForImage2Image.from_pipe(base),
            "inpaint": AutoPipelineForInpainting.from_pipe(base),
        }
    else:
        return family_pipes(name)  # type: ignore[arg-type]
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
    return pipes


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest, torch_one_thread: None) -> tuple[str, dict[str, Any]]:
    return request.param, tiny_pipes(request.param)


@pytest.fixture
def reusing_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The "fast" level reuses on every transformer step after the first (threshold 10: any change counts as
    small): on random weights the residuals change too much for the shipped thresholds ever to
    skip, which would leave the splice untested ("faster" keeps its threshold: samples that hold a
    cache yet compute every step). Both engines read the same table."""
    monkeypatch.setitem(LEVELS, "fast", dataclasses.replace(LEVELS["fast"], transformer_threshold=10.0))


def request(name: str, seed: int, cache: str, **kw: Any) -> ContinuousRequest:
    size = SIZE if name == "sd" else FAMILY_SIZE
    flux = name.startswith("flux")
    kw.setdefault("steps", STEPS)
    return ContinuousRequest(
        task=kw.pop("task", "txt2img"),
        prompt=f"a red square {seed}",
        # FLUX: true CFG, two rows per image with a cache stream each (as its pipeline's two calls).
        negative_prompt="blurry",
        true_cfg=3.0 if flux else None,
        seeds=(seed,),
        width=size,
        height=size,
        guidance=3.5 if flux else 5.0,
        cache=cache,
        **kw,
    )


def request_level(pipes: dict[str, Any], factory: Any, req: ContinuousRequest) -> np.ndarray:
    """The request-level engine's image: diffusers' pipeline under `step_cache` at the request's
    level, with the steps that engine passes (`int(steps * strength)`)."""
    with step_cache(pipes["txt2img"], req.cache, int(req.steps * req.strength)):
        return reference(pipes, factory, req, req.seeds[0])


def test_cached_and_uncached_images_sharing_iterations_match_the_request_level_engine(
    family: tuple[str, dict[str, Any]], engine_of: Any, reusing_transformers: None
) -> None:
    name, pipes = family
    engine = engine_of(max_batch_size=8)
    reqs = [
        request(name, 1, "fast"),
        request(name, 2, "off"),
        request(name, 3, "faster", steps=STEPS - 2),
    ]
    late = request(name, 4, "fast", steps=STEPS - 1)
    if name in ("sd", "sdxl"):
        reqs.append(request(name, 5, "fast", task="img2img", strength=0.8, image=_picture(reqs[0])))
    joined = threading.Event()
    submitted: list[tuple[ContinuousRequest, Any]] = []

    def on_event(event: dict[str, Any]) -> None:
        # Joins mid-flight: its first steps share iterations with the others' cached ones.
        if event["event"] == "progress" and event["step"] == 2 and not joined.is_set():
            joined.set()
            submitted.append((late, engine.submit(late)))

    submitted += [(reqs[0], engine.submit(reqs[0], on_event))] + [(r, engine.submit(r)) for r in reqs[1:]]
    for _, ticket in list(submitted):
        ticket.future.result(300)
    assert joined.is_set()
    tickets = [t for _, t in submitted]
    ordered = [r for r, _ in submitted]
    results = [t.future.result(300) for t in tickets]
    factory = scheduler_factory(pipes["inpaint"])
    for req, result in zip(ordered, results, strict=True):
        want = request_level(pipes, factory, req)
        diff = float(np.abs(result.arrays[0] - want).max())
        assert diff < TOLERANCE, f"{name} {req.cache} seed {req.seeds[0]}: {diff}"
        if req.cache == "fast" or (req.cache != "off" and name in ("sd", "sdxl")):
            # and caching changed the image: the comparison is with a cached image, not a plain one
            # (transformers at "faster" compute every step on random weights: see the fixture)
            plain = reference(pipes, factory, req, req.seeds[0])
            assert float(np.abs(result.arrays[0] - plain).max()) > 2 * TOLERANCE
    assert engine.cache_reused_steps > 0
    if name in ("sd", "sdxl"):
        # Every sample-step the schedule doesn't run in full reused its own features.
        cached = [r for r in ordered if r.cache != "off"]
        expected = sum(
            not unet_full_step(r.cache, i, int(r.steps * r.strength))
            for r in cached
            for i in range(int(r.steps * r.strength))
        )
        assert engine.cache_reused_steps == expected
    assert all(s.cache is None for t in tickets for s in t.samples)  # dropped when finished


def test_a_cancelled_sample_drops_its_cache_and_the_others_keep_theirs(
    family: tuple[str, dict[str, Any]], engine_of: Any, reusing_transformers: None
) -> None:
    name, pipes = family
    engine = engine_of(max_batch_size=4)
    cancelled = threading.Event()
    stay = request(name, 6, "fast")
    ticket_box: list[Any] = []

    def cancel_at_step_3(event: dict[str, Any]) -> None:
        if event["event"] == "progress" and event["step"] == 3 and not cancelled.is_set():
            cancelled.set()
            engine.cancel(ticket_box[0])

    ticket_box.append(engine.submit(request(name, 7, "fast", steps=20), cancel_at_step_3))
    kept = engine.submit(stay)
    result = kept.future.result(300)
    with pytest.raises(RequestCancelled):
        ticket_box[0].future.result(300)
    assert all(s.cache is None for s in ticket_box[0].samples)
    want = request_level(pipes, scheduler_factory(pipes["inpaint"]), stay)
    assert float(np.abs(result.arrays[0] - want).max()) < TOLERANCE


def test_unknown_level_is_refused_naming_the_field(
    family: tuple[str, dict[str, Any]], engine_of: Any
) -> None:
    from inference_server.continuous.core import UnsupportedRequest

    engine = engine_of()
    with pytest.raises(UnsupportedRequest, match="cache must be one of off, fast, faster"):
        engine.submit(request(family[0], 1, "fastest"))


def _picture(req: ContinuousRequest) -> Any:
    from tests.server_continuous.parity import sample_picture

    return sample_picture(req.width)


def test_a_failed_call_leaves_every_cache_as_it_was(
    family: tuple[str, dict[str, Any]],
    engine_of: Any,
    reusing_transformers: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Out of memory in a call where some samples reuse their caches: the engine halves the batch
    and retries, and since a failed call changed no cache state the images are still exact."""
    import inference_server.continuous.caching as caching
    import inference_server.continuous.unet as unet

    name, pipes = family
    failures = {"left": 1}

    def failing_once(original: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)  # the state-changing work runs, then the call fails
            if failures["left"]:
                failures["left"] -= 1
                raise torch.OutOfMemoryError("out of memory (test)")
            return result

        return call

    if name in ("sd", "sdxl"):
        monkeypatch.setattr(unet, "shallow_forward", failing_once(unet.shallow_forward))
    else:
        monkeypatch.setattr(caching, "transformer_reuses", failing_once(caching.transformer_reuses))
    engine = engine_of(max_batch_size=4)
    reqs = [request(name, 8, "fast"), request(name, 9, "faster"), request(name, 10, "off")]
    tickets = [engine.submit(r) for r in reqs]
    results = [t.future.result(300) for t in tickets]
    assert failures["left"] == 0 and engine._limit < 4  # it failed, and the batch was halved
    if name in ("sd", "sdxl"):  # and counted no step: the retry's is the only one
        cached = [r for r in reqs if r.cache != "off"]
        assert engine.cache_reused_steps == sum(
            not unet_full_step(r.cache, i, r.steps) for r in cached for i in range(r.steps)
        )
        assert engine.cache_full_steps == sum(
            unet_full_step(r.cache, i, r.steps) for r in cached for i in range(r.steps)
        )
    factory = scheduler_factory(pipes["inpaint"])
    for req, result in zip(reqs, results, strict=True):
        diff = float(np.abs(result.arrays[0] - request_level(pipes, factory, req)).max())
        assert diff < TOLERANCE, f"{name} {req.cache} seed {req.seeds[0]}: {diff}"
