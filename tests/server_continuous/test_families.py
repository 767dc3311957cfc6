"""The continuous engine over SDXL, SD 3.x (with and without T5) and FLUX.1 (dev, schnell).

Every image equals the family's own diffusers pipeline call for its seed (txt2img, img2img and
inpaint, every sampler the family takes) while requests share iterations; requests join a running
batch mid-flight and leave it first; a cancelled request leaves at the next step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from inference_server.continuous.core import ContinuousRequest, RequestCancelled
from inference_server.continuous.engine import scheduler_factory
from inference_server.tiny_families import TinyFamily
from tests.server_continuous.family_parity import FAMILIES, FAMILY_SIZE, family_pipes, family_requests
from tests.server_continuous.parity import reference
from tests.server_continuous.test_scheduling import Recorder

# As tests/server_continuous/test_parity.py: batched and solo calls differ by float rounding
# (~1e-6 here); a real mistake (a timestep, a draw, a shift, a guidance row) is >= 1e-2.
TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest, torch_one_thread: None) -> tuple[TinyFamily, dict[str, Any]]:
    return request.param, family_pipes(request.param)


def request(name: str, steps: int, **kw: Any) -> ContinuousRequest:
    kw.setdefault("guidance", 0.0 if name == "flux_schnell" else 4.0)
    kw.setdefault("prompt", "x")
    kw.setdefault("seeds", (1,))
    return ContinuousRequest(task="txt2img", width=FAMILY_SIZE, height=FAMILY_SIZE, steps=steps, **kw)


def test_every_task_and_sampler_matches_the_familys_pipeline_while_sharing_iterations(
    family: tuple[TinyFamily, dict[str, Any]], engine_of: Any
) -> None:
    name, pipes = family
    engine = engine_of(max_batch_size=4)
    reqs = family_requests(name)
    tickets = [engine.submit(r) for r in reqs]
    results = [t.future.result(300) for t in tickets]
    factory = scheduler_factory(pipes["inpaint"])
    worst: dict[str, float] = {}
    for req, result in zip(reqs, results, strict=True):
        for seed, array in zip(req.seeds, result.arrays, strict=True):
            key = f"{req.task}/{req.scheduler}/{req.width}x{req.height}/g{req.guidance}"
            diff = float(np.abs(reference(pipes, factory, req, seed) - array).max())
            worst[key] = max(worst.get(key, 0.0), diff)
    assert max(worst.values()) < TOLERANCE, worst
    assert {r.task for r in reqs} == {"txt2img", "img2img", "inpaint"}
    # They shared iterations: some request saw the full batch, and the engine ran fewer iterations
    # than the sum of every image's model evaluations.
    assert max(r.batch_size for r in results) == 4
    assert engine.iterations < sum(r.iterations * len(q.seeds) for q, r in zip(reqs, results, strict=True))


def test_a_request_arriving_mid_run_joins_and_leaves_first(
    family: tuple[TinyFamily, dict[str, Any]], engine_of: Any
) -> None:
    name = family[0]
    engine = engine_of(max_batch_size=4)
    late: dict[str, Any] = {}
    finished: list[str] = []
    long_events = Recorder(
        at_step=2, action=lambda: late.setdefault("ticket", engine.submit(request(name, 3), late_events))
    )
    late_events = Recorder()
    long = engine.submit(request(name, 20, prompt="long"), long_events)
    long.future.add_done_callback(lambda f: finished.append("long"))
    assert long_events.fired.wait(120)
    late["ticket"].future.add_done_callback(lambda f: finished.append("late"))
    long_result = long.future.result(120)
    late_result = late["ticket"].future.result(120)
    assert finished == ["late", "long"]
    assert late_events.events[1] == {"event": "started", "batch_size": 2}  # joined the running batch
    assert late_result.iterations == 3 and long_result.iterations == 20
    assert engine.iterations == 20  # one iteration per step of the long request, shared


def test_a_cancelled_request_leaves_at_the_next_step(
    family: tuple[TinyFamily, dict[str, Any]], engine_of: Any
) -> None:
    name = family[0]
    engine = engine_of(max_batch_size=1)
    holder: dict[str, Any] = {}
    events = Recorder(at_step=2, action=lambda: engine.cancel(holder["doomed"]))
    holder["doomed"] = engine.submit(request(name, 50), events)
    waiting = engine.submit(request(name, 3))
    with pytest.raises(RequestCancelled):
        holder["doomed"].future.result(120)
    assert waiting.future.result(120).iterations == 3
    assert engine.iterations == 2 + 3


def test_sizes_the_family_cannot_make_are_refused_naming_the_multiple(
    family: tuple[TinyFamily, dict[str, Any]], engine_of: Any
) -> None:
    from dataclasses import replace

    from inference_server.continuous.core import UnsupportedRequest

    name = family[0]
    engine = engine_of(max_batch_size=1)
    multiple = 8 if name == "sdxl" else 16  # SD3: 8x VAE x 2x2 patches; FLUX: 8x VAE x 2x2 packing
    with pytest.raises(UnsupportedRequest, match=f"multiples of {multiple}"):
        engine.submit(replace(request(name, 2), width=FAMILY_SIZE + multiple // 2))


def test_inpainting_checkpoints_whose_denoiser_takes_the_mask_fall_back() -> None:
    """Every served family runs step by step; a denoiser that also takes the mask and masked image
    (a 33-channel SD3 inpainting transformer, a FLUX Fill one) is left to the request-level engine."""
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from inference_server.continuous.families import unsupported_reason
    from inference_server.tiny_families import TINY_FAMILIES, build_tiny_family

    for name in TINY_FAMILIES:
        assert unsupported_reason(build_tiny_family(name)) is None, name
    sd3 = build_tiny_family("sd3_no_t5")
    torch.manual_seed(0)
    sd3.transformer = SD3Transformer2DModel.from_config({**sd3.transformer.config, "in_channels": 33})
    assert "33 input channels" in (unsupported_reason(sd3) or "")
    flux = build_tiny_family("flux_schnell")
    flux.transformer = FluxTransformer2DModel.from_config({**flux.transformer.config, "in_channels": 384})
    assert "Fill/Control" in (unsupported_reason(flux) or "")


def test_a_denoiser_call_failing_on_one_request_fails_only_that_request(
    family: tuple[TinyFamily, dict[str, Any]], engine_of: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any call holding the poisoned prompt's rows fails (simulated): it is retried in halves, the
    poisoned request fails alone and the others' images still equal their pipeline's."""
    import torch

    from inference_server.engine import GenerationFailed

    name, pipes = family
    engine = engine_of(max_batch_size=8)
    with torch.inference_mode():  # as the engine's worker encodes (T5's output differs by ~1e-7 outside)
        poison = engine.denoiser.encode_text("poisoned")[0][0]
    model = pipes["inpaint"].unet if name == "sdxl" else pipes["inpaint"].transformer
    real_forward = model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        hidden = kwargs["encoder_hidden_states"]
        if any(torch.equal(row, poison) for row in hidden):
            raise ValueError("this request's state breaks the model (simulated)")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    goods = [request(name, 3, prompt=f"fine {i}", seeds=(i,)) for i in range(3)]
    culprit = engine.submit(request(name, 3, prompt="poisoned"))
    tickets = [engine.submit(r) for r in goods]
    with pytest.raises(GenerationFailed, match="model failed"):
        culprit.future.result(120)
    results = [t.future.result(120) for t in tickets]
    monkeypatch.undo()
    factory = scheduler_factory(pipes["inpaint"])
    for req, result in zip(goods, results, strict=True):
        assert np.abs(reference(pipes, factory, req, req.seeds[0]) - result.arrays[0]).max() < TOLERANCE
