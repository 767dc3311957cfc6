"""Step caching on the tiny random-weight pipelines of every family: `python -m tests.bench.cache_quality`
(run by `make eval-model`, after the embedded model's accuracy figures).

Random weights make no pictures to judge, so this reports only the mean absolute pixel difference
(0-255) between each cache level's images and the uncached ones of the same seeds (64x64, 20 steps,
4 images), and how many steps ran in full. The embedded model's accuracy per level comes from
`python -m inference_server.embedded.evaluate` (the same `make eval-model`).
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from inference_server.step_cache import CACHE_LEVELS, step_cache
from inference_server.tiny_families import build_tiny_family

FAMILIES = ("sd15", "sd2v", "sdxl", "sd3", "flux_dev")
STEPS = 20


def main() -> None:
    torch.set_num_threads(2)
    print(
        f"step caching on tiny random pipelines, 64x64, {STEPS} steps, 4 images "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})"
    )
    print(
        f"{'family':<10}"
        + "".join(f"{level:>12}" for level in CACHE_LEVELS[1:])
        + "   (mean |pixel diff| vs off, 0-255)"
    )
    for name in FAMILIES:
        pipe = build_tiny_family(name)
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.eval()  # built from configs: training mode (dropout) until told
        pipe.set_progress_bar_config(disable=True)
        scheduler = copy.deepcopy(pipe.scheduler)
        images = {}
        for level in CACHE_LEVELS:
            pipe.scheduler = copy.deepcopy(scheduler)  # a fresh scheduler per call, as the server does
            with torch.inference_mode(), step_cache(pipe, level, STEPS):
                images[level] = (
                    pipe(
                        ["a red circle", "a blue square", "a green triangle", "a white star"],
                        generator=[torch.Generator("cpu").manual_seed(s) for s in range(4)],
                        num_inference_steps=STEPS,
                        height=64,
                        width=64,
                        output_type="np",
                    ).images
                    * 255
                )
        row = "".join(
            f"{float(np.abs(images[level] - images['off']).mean()):>12.2f}" for level in CACHE_LEVELS[1:]
        )
        print(f"{name:<10}{row}")


if __name__ == "__main__":
    main()
