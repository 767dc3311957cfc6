"""`make gpu-check`: what this server does on a machine with an NVIDIA GPU (docs/performance.md).

    python deploy/gpu_check.py            # every check, then the benchmark at real sizes
    python deploy/gpu_check.py --quick    # the checks and a short benchmark

Checks, each printed as PASS/FAIL with its figure:
1. CUDA is detected (device name, memory).
2. fp16 and bf16 images match the fp32 CPU images of the same seeds (SD 1.5-layout random-weight
   pipeline at 64x64): mean absolute pixel difference <= TOLERANCE.
3. SDPA and, where installed, xformers attention give the same images (same tolerance).
4. The out-of-memory split-and-retry, for real: the request-level runner on a batch whose call is
   made to exceed the memory allowed to this process (torch.cuda.set_per_process_memory_fraction),
   which must finish by halving, every image delivered.
5. Both engines (dynamic and continuous) serve a request on CUDA.
6. Benchmark: SD 1.5-sized (512x512, 50 steps) and SDXL-sized (1024x1024, 30 steps) random-weight
   pipelines built from the full-size configs, batch 1 and 8, with and without step caching and
   torch.compile, next to the published A100 figures (SD 1.5, 50 steps: 1.59 s/image plain,
   1.07 s compiled; diffusers' torch 2.0 page).

Without an NVIDIA GPU it prints why and exits with status 2 (distinct from a failed check, 1).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

NO_GPU = 2
FAILED = 1
# Mean absolute pixel difference (0-255) allowed between a half-precision or other-attention image
# and the fp32 CPU one: GPU kernels and half precision change the last bits, which a 50-step
# sampler can grow into a few levels; a wrong kernel shows tens.
TOLERANCE = 4.0
PUBLISHED = {"sd15_plain_s": 1.59, "sd15_compiled_s": 1.07}  # A100, SD 1.5, 512x512, 50 steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 1 only, fewer steps in the benchmark")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(
            "gpu-check: no NVIDIA GPU here (torch.cuda.is_available() is False; torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}). Run it on a machine with an "
            "NVIDIA GPU and the CUDA build of torch (`make setup` picks it there)."
        )
        return NO_GPU
    results = [
        check("CUDA detected", cuda_detected),
        check("fp16 and bf16 match fp32 on the CPU", precisions_match),
        check("SDPA and xformers attention match", attention_match),
        check("out-of-memory split and retry", oom_split),
        check("both engines serve on CUDA", engines_serve),
    ]
    benchmark(quick=args.quick)
    print("gpu-check:", "all checks passed" if all(results) else "SOME CHECKS FAILED")
    return 0 if all(results) else FAILED


def check(name: str, fn: Any) -> bool:
    try:
        ok, detail = fn()
    except Exception as e:  # a check that crashes is a failed check, and the others still run
        ok, detail = False, f"{type(e).__name__}: {e}"
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    return ok


def cuda_detected() -> tuple[bool, str]:
    import torch

    props = torch.cuda.get_device_properties(0)
    return True, f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}"


def _pipeline(family: str = "sd15") -> Any:
    from inference_server.tiny_families import build_tiny_family

    pipe = build_tiny_family(family)  # type: ignore[arg-type]
    for module in pipe.components.values():
        if hasattr(module, "eval"):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe: Any, device: str, dtype: Any, steps: int = 20) -> Any:
    import numpy as np
    import torch

    pipe.to(device, dtype)
    generators = [torch.Generator("cpu").manual_seed(s) for s in (1, 2)]
    with torch.inference_mode():
        out = pipe(
            ["a red circle", "a blue square"],
            generator=generators,
            num_inference_steps=steps,
            height=64,
            width=64,
            output_type="np",
        ).images
    return np.asarray(out, dtype=np.float32) * 255


def precisions_match() -> tuple[bool, str]:
    import numpy as np
    import torch

    pipe = _pipeline()
    reference = _images(pipe, "cpu", torch.float32)
    diffs = {}
    for dtype in (torch.float16, torch.bfloat16):
        diffs[str(dtype).removeprefix("torch.")] = float(
            np.abs(_images(pipe, "cuda", dtype) - reference).mean()
        )
    worst = max(diffs.values())
    return worst <= TOLERANCE, f"mean |pixel diff| vs fp32 CPU {diffs} (tolerance {TOLERANCE})"


def attention_match() -> tuple[bool, str]:
    import numpy as np
    import torch

    pipe = _pipeline()
    sdpa = _images(pipe, "cuda", torch.float16)
    try:
        pipe.enable_xformers_memory_efficient_attention()
    except Exception as e:
        return True, f"SDPA only: xformers not usable here ({type(e).__name__}: {e})"
    diff = float(np.abs(_images(pipe, "cuda", torch.float16) - sdpa).mean())
    return diff <= TOLERANCE, f"xformers vs SDPA mean |pixel diff| {diff:.2f} (tolerance {TOLERANCE})"


def _saved(family: str, folder: Path) -> Path:
    from inference_server.tiny_families import save_tiny_family

    if not (folder / "model_index.json").exists():
        save_tiny_family(family, folder)  # type: ignore[arg-type]
    return folder


def oom_split() -> tuple[bool, str]:
    import asyncio

    import torch

    from inference_server.config import ModelConfig
    from inference_server.engine import GenerationRequest
    from inference_server.pipelines import PipelineRunner

    path = _saved("sd15", Path("/tmp/imagine-gpu-check/sd15"))
    runner = PipelineRunner(ModelConfig(path=str(path), device="cuda", warmup=False))

    async def go() -> Any:
        await runner.load()
        requests = [GenerationRequest("txt2img", f"p{i}", "", (i,), 1024, 1024, 2, 7.5) for i in range(16)]
        free, total = torch.cuda.mem_get_info()
        # Allow what one batch of 16 1024x1024 images can't fit in but a handful can: the first call
        # fails with a real CUDA out-of-memory error and the runner halves until calls fit.
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, (torch.cuda.memory_allocated() + 3 * 2**30) / total)
        )
        try:
            return await runner.run(requests, None, lambda: False)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)

    report = asyncio.run(go())
    runner.close()
    delivered = sum(o.images is not None for o in report.outcomes)
    split = len(report.call_sizes) > 1
    return split and delivered == 16, f"calls of {report.call_sizes} images; {delivered}/16 delivered"


def engines_serve() -> tuple[bool, str]:
    import asyncio

    from inference_server.batcher import DynamicBatchingEngine
    from inference_server.config import BatchingConfig, ModelConfig
    from inference_server.continuous.engine import ContinuousBatchingEngine
    from inference_server.engine import GenerationRequest
    from inference_server.metrics import Metrics
    from inference_server.pipelines import PipelineRunner

    path = _saved("sd15", Path("/tmp/imagine-gpu-check/sd15"))
    served = []
    for cls in (DynamicBatchingEngine, ContinuousBatchingEngine):

        async def go(cls: Any = cls) -> None:
            engine = cls(
                PipelineRunner(ModelConfig(path=str(path), device="cuda")), BatchingConfig(), Metrics()
            )
            await engine.start()
            await engine.wait_ready()
            job = engine.submit(GenerationRequest("txt2img", "x", "", (1, 2), 64, 64, 4, 7.5), timeout_s=120)
            result = await job.wait()
            served.append(f"{engine.name}: {len(result.images)} images in {result.run_s:.2f} s")
            await engine.stop(5)

        asyncio.run(go())
    return len(served) == 2, "; ".join(served)


def benchmark(quick: bool) -> None:
    """Random-weight pipelines from the full-size configs, fp16, images/s and s/image."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    from inference_server.step_cache import RECOMMENDED_LEVEL, step_cache

    print("\nbenchmark (random weights, full-size UNets, fp16, SDPA):")
    sizes = {
        "SD 1.5": (StableDiffusionPipeline, _sd15_unet_config(), 512, 50),
        "SDXL": (StableDiffusionXLPipeline, _sdxl_unet_config(), 1024, 30),
    }
    for name, (_, unet_config, side, steps) in sizes.items():
        steps = 10 if quick else steps
        unet = UNet2DConditionModel(**unet_config).to("cuda", torch.float16).eval()
        for compiled in (False, True):
            if compiled:
                started = time.perf_counter()
                unet.compile()
                print(
                    f"  {name}: torch.compile set up in {time.perf_counter() - started:.1f} s (compiles on first call)"
                )
            for batch in (1,) if quick else (1, 8):
                for level in ("off", RECOMMENDED_LEVEL):
                    seconds = _time_unet(unet, unet_config, side, steps, batch, level, step_cache)
                    line = f"  {name} {side}x{side} {steps} steps batch {batch} compile={compiled} cache={level}: "
                    line += f"{seconds / batch:.3f} s/image (UNet only, CFG)"
                    if name == "SD 1.5" and batch == 1 and level == "off" and steps == 50:
                        ref = PUBLISHED["sd15_compiled_s" if compiled else "sd15_plain_s"]
                        line += f"; published A100 whole pipeline {ref} s/image"
                    print(line)
        del unet
        torch.cuda.empty_cache()


def _time_unet(
    unet: Any, config: dict[str, Any], side: int, steps: int, batch: int, level: str, cache: Any
) -> float:
    """Seconds for `steps` UNet evaluations with CFG (batch x 2 rows), after one warm-up pass."""
    import torch

    class Holder:  # step_cache looks for `.unet`
        pass

    holder = Holder()
    holder.unet = unet  # type: ignore[attr-defined]
    latents = torch.randn(2 * batch, 4, side // 8, side // 8, device="cuda", dtype=torch.float16)
    context = torch.randn(2 * batch, 77, config["cross_attention_dim"], device="cuda", dtype=torch.float16)
    extra: dict[str, Any] = {}
    if config.get("addition_embed_type") == "text_time":
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2 * batch, 1280, device="cuda", dtype=torch.float16),
            "time_ids": torch.randn(2 * batch, 6, device="cuda", dtype=torch.float16),
        }
    result = 0.0
    for _attempt in range(2):  # the first pass warms up (and compiles)
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.inference_mode(), cache(holder, level, steps):
            for i in range(steps):
                unet(latents, 999 - i * (1000 // steps), encoder_hidden_states=context, **extra)
        torch.cuda.synchronize()
        result = time.perf_counter() - started
    return result


def _sd15_unet_config() -> dict[str, Any]:
    return dict(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
    )


def _sdxl_unet_config() -> dict[str, Any]:
    return dict(
        sample_size=128,
        cross_attention_dim=2048,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


if __name__ == "__main__":
    raise SystemExit(main())
