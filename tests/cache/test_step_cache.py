"""Step caching on real pipelines: the embedded model and a tiny random pipeline of every family.

"off" leaves the network untouched (bit-identical images, hooks removed after a cached call); every
level really skips work and stays close to the uncached image; DeepCache's shallow path computes
exactly what the full UNet computes from the same deep features.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import numpy as np
import pytest
import torch

from inference_server.config import EMBEDDED_WEIGHTS
from inference_server.step_cache import (
    CACHE_LEVELS,
    LEVELS,
    deep_cache,
    first_block_cache,
    full_steps,
    level_problem,
    shallow_forward,
    step_cache,
    unet_full_step,
)
from inference_server.tiny_families import build_tiny_family

# Mean absolute pixel difference (0-1 scale) to the uncached image that a level may not exceed on
# these random or tiny models at 8 steps (few steps: each reused step stands in for a big change).
# A loose bound that catches a broken path (noise, a wrong skip connection: ~0.5 and more); the
# embedded model's accuracy figures at 20 steps are in docs/performance.md (`make eval-model`).
MAX_MEAN_DIFF = 0.35
STEPS = 8


@functools.cache
def pipeline(name: str) -> Any:
    if name == "embedded":
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(str(EMBEDDED_WEIGHTS), local_files_only=True)
    else:
        pipe = build_tiny_family(name)  # type: ignore[arg-type]
        # Built from configs, the modules are in training mode (dropout); from_pretrained, as the
        # server loads them, puts them in eval mode.
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.eval()
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler_prototype = copy.deepcopy(pipe.scheduler)
    return pipe


def generate(pipe: Any, level: str | None) -> np.ndarray:
    kwargs: dict[str, Any] = {
        "prompt": ["a red circle on a blue background", "a green square on a white background"],
        "generator": [torch.Generator("cpu").manual_seed(seed) for seed in (1, 2)],
        "num_inference_steps": STEPS,
        "output_type": "np",
        "height": 64,
        "width": 64,
    }
    # A fresh scheduler per call, as the server gives each call (some keep state between calls).
    pipe.scheduler = copy.deepcopy(pipe.scheduler_prototype)
    with torch.inference_mode():
        if level is None:
            return pipe(**kwargs).images
        with step_cache(pipe, level, STEPS):
            return pipe(**kwargs).images


FAMILIES = ["embedded", "sd15", "sd2v", "sdxl", "sd3", "flux_dev"]


@pytest.mark.parametrize("name", FAMILIES)
def test_off_is_bit_identical_and_levels_stay_close(name: str) -> None:
    torch.set_num_threads(1)
    pipe = pipeline(name)
    before = generate(pipe, None)
    assert np.array_equal(generate(pipe, "off"), before)
    for level in CACHE_LEVELS[1:]:
        cached = generate(pipe, level)
        diff = float(np.abs(cached - before).mean())
        assert diff < MAX_MEAN_DIFF, f"{name} at {level}: mean pixel difference {diff:.3f}"
        assert np.isfinite(cached).all()
    # The hooks went away with the call: the network is exactly as before.
    assert np.array_equal(generate(pipe, None), before)


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("name", ["embedded", "sd15", "sdxl"])
def test_deep_cache_skips_steps_and_its_shallow_path_is_exact(name: str, depth: int) -> None:
    pipe = pipeline(name)
    unet = pipe.unet
    # 16: the embedded model's latent; 5: not a multiple of the tiny UNets' down-sampling, so the
    # up blocks must up-sample to the skip connections' sizes as the full UNet does.
    size = 16 if name == "embedded" else 5
    torch.manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, size, size)
    context = torch.randn(2, 4, unet.config.cross_attention_dim)
    extra: dict[str, Any] = {}
    if name == "sdxl":
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pipe.text_encoder_2.config.projection_dim),
            "time_ids": torch.randn(2, 6),
        }
    t = torch.tensor(500)
    with torch.inference_mode(), deep_cache(unet, lambda step: step % 3 == 0, depth) as state:
        full = unet(x, t, encoder_hidden_states=context, **extra).sample
        # From the features of this very step the shallow path must give the full step's output.
        shallow = shallow_forward(unet, state.deep, x, t, context, depth=depth, **extra).sample
        assert torch.allclose(full, shallow, atol=1e-6)
        for _ in range(5):
            unet(x, t, encoder_hidden_states=context, **extra)
    assert (state.full_steps, state.shallow_steps) == (2, 4)  # steps 0 and 3 in full


def test_first_block_cache_skips_blocks_when_the_first_block_barely_changes() -> None:
    pipe = pipeline("flux_dev")
    transformer = pipe.transformer
    with first_block_cache(transformer, threshold=10.0) as state:  # everything counts as "barely"
        generate_flux(pipe)
    # The first step computes everything; every later one reuses the cached residual.
    assert (state.full_steps, state.cached_steps) == (1, STEPS - 1)
    with first_block_cache(transformer, threshold=0.0) as state:  # nothing does
        generate_flux(pipe)
    assert (state.full_steps, state.cached_steps) == (STEPS, 0)


def generate_flux(pipe: Any) -> None:
    with torch.inference_mode():
        pipe(
            prompt="a red circle",
            generator=torch.Generator("cpu").manual_seed(1),
            num_inference_steps=STEPS,
            output_type="np",
            height=64,
            width=64,
        )


def test_level_names() -> None:
    assert CACHE_LEVELS == ("off", "fast", "faster")
    assert level_problem("fast") is None
    assert level_problem("fastest") == "must be one of off, fast, faster, got 'fastest'"
    # Cheaper levels cache more.
    assert 20 == full_steps("off", 20) > full_steps("fast", 20) > full_steps("faster", 20)
    assert LEVELS["fast"].transformer_threshold < LEVELS["faster"].transformer_threshold


@pytest.mark.parametrize("level", CACHE_LEVELS)
@pytest.mark.parametrize("steps", [1, 2, 8, 20, 50])
def test_unet_schedule_is_a_function_of_step_and_step_count(level: str, steps: int) -> None:
    schedule = [unet_full_step(level, step, steps) for step in range(steps)]
    assert schedule[0]  # nothing cached yet
    spec = LEVELS[level]
    # The first steps, where a picture's layout and colours form, all run in full.
    assert all(schedule[: max(1, round(spec.unet_warmup * steps))])
    # Never more than interval - 1 shallow steps in a row.
    run = longest = 0
    for full in schedule:
        run = 0 if full else run + 1
        longest = max(longest, run)
    assert longest <= spec.unet_interval - 1
    # Asking again, or out of order (as the continuous engine does per sample), answers the same.
    assert [unet_full_step(level, step, steps) for step in reversed(range(steps))] == schedule[::-1]


def test_a_deep_cache_call_follows_its_schedule() -> None:
    """step_cache runs exactly the steps unet_full_step names in full (counted on the embedded UNet)."""
    pipe = pipeline("embedded")
    full_calls = 0
    original = type(pipe.unet).forward

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal full_calls
        full_calls += 1
        return original(self, *args, **kwargs)

    for level in CACHE_LEVELS:
        full_calls = 0
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(type(pipe.unet), "forward", counting)
            generate(pipe, level)
        assert full_calls == full_steps(level, STEPS), level


@pytest.mark.parametrize("level", CACHE_LEVELS)
@pytest.mark.parametrize("steps", [4, 8, 20])
def test_unet_full_step_is_deep_caches_schedule(level: str, steps: int) -> None:
    """The continuous engine's per-sample schedule (`unet_full_step`) is the one `deep_cache` runs."""
    pipe = pipeline("sd15")
    unet = pipe.unet
    x = torch.randn(1, unet.config.in_channels, 8, 8)
    context = torch.randn(1, 4, unet.config.cross_attention_dim)
    spec = LEVELS[level]
    ran_full = []
    schedule = functools.partial(unet_full_step, level, steps=steps)
    with torch.inference_mode(), deep_cache(unet, lambda i: schedule(step=i), spec.unet_depth) as state:
        for _ in range(steps):
            before = state.full_steps
            unet(x, torch.tensor(500), encoder_hidden_states=context)
            ran_full.append(state.full_steps > before)
    assert ran_full == [unet_full_step(level, i, steps) for i in range(steps)]
