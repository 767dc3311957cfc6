"""Each image from the continuous engine equals diffusers' own pipeline call for its seed."""

from __future__ import annotations

from typing import Any

from inference_server.continuous.engine import scheduler_factory
from tests.server_continuous.conftest import SIZE
from tests.server_continuous.parity import SCHEDULER_NAMES, max_differences

# Batched and solo UNet calls differ by float rounding (~1e-6 on CPU); 20 steps of a sampler can
# grow that tenfold. A real mistake (wrong timestep, generator order, guidance row) is >= 1e-2.
TOLERANCE = 1e-4


def test_every_task_and_sampler_matches_diffusers_while_sharing_iterations(
    pipes: dict[str, Any], make_engine: Any
) -> None:
    # Batch 5 is smaller than the 19 requests (21 images): requests join as others leave, some
    # two-image requests join partly, and every sample shares iterations with different work.
    engine = make_engine(max_batch_size=5)
    rows = max_differences(engine, pipes, scheduler_factory(pipes["inpaint"]), SIZE)
    worst = {f"{r.task}/{r.scheduler}/{r.width}x{r.height}": d for r, d, _ in rows}
    assert max(worst.values()) < TOLERANCE, worst
    assert {r.scheduler for r, _, _ in rows if r.task == "txt2img"} == set(SCHEDULER_NAMES)
    assert {r.task for r, _, _ in rows} == {"txt2img", "img2img", "inpaint"}
    # Requests really shared iterations: the engine ran far fewer UNet iterations than the sum of
    # every sample's model evaluations, and some request saw the full batch.
    assert max(res.batch_size for _, _, res in rows) == 5
    assert engine.samples_done == sum(len(r.seeds) for r, _, _ in rows)


def test_inpaint_keeps_the_original_outside_the_mask(pipes: dict[str, Any], make_engine: Any) -> None:
    import numpy as np

    from inference_server.continuous.core import ContinuousRequest
    from tests.server_continuous.parity import sample_picture

    image, mask = sample_picture(SIZE), sample_picture(SIZE, mask=True)
    engine = make_engine(max_batch_size=2)
    result = engine.submit(
        ContinuousRequest(
            task="inpaint", prompt="x", seeds=(7,), width=SIZE, height=SIZE, steps=3, guidance=5.0,
            image=image, mask=mask,
        )
    ).future.result(60)  # fmt: skip
    out = np.asarray(result.images[0])
    keep = np.asarray(mask) == 0
    assert np.array_equal(out[keep], np.asarray(image)[keep])
    assert not np.array_equal(out[~keep], np.asarray(image)[~keep])  # the masked square was repainted


def test_v_prediction_zero_snr_trailing_schedules_match_too(torch_one_thread: None) -> None:
    """SD 2.x-style v-prediction, and the zero-terminal-SNR "trailing" set-up of the embedded model."""
    from dataclasses import replace

    import numpy as np
    from diffusers import (
        DPMSolverMultistepScheduler,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
    )

    from inference_server.continuous.core import ContinuousEngine
    from inference_server.testing import TinyPipelineSpec, build_tiny_pipeline
    from tests.server_continuous.parity import parity_requests, reference

    base = build_tiny_pipeline(TinyPipelineSpec(sample_size=SIZE, seed=3))
    base.scheduler = DPMSolverMultistepScheduler.from_config(
        base.scheduler.config,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
    )
    pipes = {
        "txt2img": base,
        "img2img": StableDiffusionImg2ImgPipeline.from_pipe(base),
        "inpaint": StableDiffusionInpaintPipeline.from_pipe(base),
    }
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
    factory = scheduler_factory(pipes["inpaint"])
    # Every task, a stochastic and a two-evaluation sampler; "default" is the DPM++ above.
    wanted = {"default", "euler_a", "heun", "ddim"}
    reqs = [replace(r, steps=5) for r in parity_requests(SIZE) if r.scheduler in wanted and r.width == SIZE]
    engine = ContinuousEngine(pipes["inpaint"], max_batch_size=4, scheduler_factory=factory)
    engine.start()
    try:
        results = [t.future.result(120) for t in [engine.submit(r) for r in reqs]]
    finally:
        engine.stop()
    worst = 0.0
    for req, res in zip(reqs, results, strict=True):
        for seed, arr in zip(req.seeds, res.arrays, strict=True):
            worst = max(worst, float(np.abs(reference(pipes, factory, req, seed) - arr).max()))
    assert {r.task for r in reqs} == {"txt2img", "img2img", "inpaint"}
    assert worst < TOLERANCE


def test_sd_turbo_style_one_step_without_guidance_matches(pipes: dict[str, Any], make_engine: Any) -> None:
    """SD-Turbo: Euler ancestral with "trailing" spacing, 1-4 steps, guidance 0 (no CFG rows)."""
    import numpy as np
    from diffusers import EulerAncestralDiscreteScheduler

    from inference_server.continuous.core import ContinuousRequest
    from tests.server_continuous.parity import reference

    config = EulerAncestralDiscreteScheduler.from_config(
        pipes["txt2img"].scheduler.config, timestep_spacing="trailing"
    ).config

    def factory(name: str | None) -> Any:
        return EulerAncestralDiscreteScheduler.from_config(config)

    engine = make_engine(max_batch_size=4, scheduler_factory=factory)
    reqs = [
        ContinuousRequest(task="txt2img", prompt=f"turbo {steps}", seeds=(steps, 50 + steps), width=SIZE,
                          height=SIZE, steps=steps, guidance=0.0)
        for steps in (1, 2, 4)
    ]  # fmt: skip
    results = [t.future.result(60) for t in [engine.submit(r) for r in reqs]]
    worst = max(
        float(np.abs(reference(pipes, factory, r, seed) - arr).max())
        for r, res in zip(reqs, results, strict=True)
        for seed, arr in zip(r.seeds, res.arrays, strict=True)
    )
    assert worst < TOLERANCE
    assert [res.iterations for res in results] == [1, 2, 4]
