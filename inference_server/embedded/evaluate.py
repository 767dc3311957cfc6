"""Evaluate the embedded model: prompt accuracy, where colour is lost, inpainting, img2img, latency.

    python -m inference_server.embedded.evaluate                    # the shipped weights
    python -m inference_server.embedded.evaluate --weights data/train/pipeline --quick

Generates a fixed list of prompts x seeds, reads each image back with the analyser (background
colour, shape colour, shape kind) and prints the accuracy of each, writes a sample grid to
data/eval/grid.png (and, for the shipped weights, inference_server/embedded/sample_grid.png) and the
figures to data/eval/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import dataset
from .analyser import analyse

WEIGHTS = Path(__file__).resolve().parent / "weights"
PACKAGE_GRID = Path(__file__).resolve().parent / "sample_grid.png"


def eval_prompts() -> list[tuple[str, str, str]]:
    """(shape, colour, background): every shape x colour, each on two fixed backgrounds."""
    names = list(dataset.COLOURS)
    out = []
    for si, s in enumerate(dataset.SHAPES):
        for ci, c in enumerate(names):
            for k in (1, 4):
                b = names[(ci + k + si) % len(names)]
                if b == c:
                    b = names[(ci + k + si + 1) % len(names)]
                out.append((s, c, b))
    return out


def load_pipeline(folder: Path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(
    pipe,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    guidance: float,
    batch: int = 8,
    cache: str = "off",
) -> list[Image.Image]:
    """Images in calls of `batch`; `cache` is the step-cache level of each call."""
    from inference_server.step_cache import step_cache

    images: list[Image.Image] = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch]]
        # One cache per pipeline call, as the server does: cached features never cross calls.
        with step_cache(pipe, cache, steps):
            out = pipe(
                prompts[i : i + batch],
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=gens,
                height=64,
                width=64,
            )
        images.extend(out.images)
    return images


def cache_comparison(
    pipe, levels: list[str], expected, prompts, seeds, steps: int, guidance: float, uncached
) -> dict:
    """Accuracy at each step-cache level and the mean pixel difference (0-255) to the uncached images
    of the same prompts and seeds (`inference_server/step_cache.py`)."""
    out = {}
    reference = np.stack([np.asarray(im, np.float32) for im in uncached])
    for level in levels:
        t = time.time()
        images = generate(pipe, prompts, seeds, steps, guidance, cache=level)
        got = np.stack([np.asarray(im, np.float32) for im in images])
        res = score(expected, images)
        res["mean_abs_pixel_diff_vs_off"] = round(float(np.abs(got - reference).mean()), 2)
        res["generate_s"] = round(time.time() - t, 1)
        out[level] = res
        print(
            f"  cache {level:>6}: background {res['background']:.1%}  shape colour {res['colour']:.1%}  "
            f"shape kind {res['shape']:.1%}  mean |pixel diff| vs off {res['mean_abs_pixel_diff_vs_off']:.2f}/255"
        )
    return out


def score(expected: list[tuple[str, str, str]], images: list[Image.Image]) -> dict:
    hits = Counter()
    confusions: Counter[str] = Counter()
    for (s, c, b), im in zip(expected, images, strict=True):
        a = analyse(im)
        hits["background"] += a.background == b
        hits["colour"] += a.colour == c
        hits["shape"] += a.shape == s
        hits["all"] += (a.background, a.colour, a.shape) == (b, c, s)
        if a.colour != c:
            confusions[f"shape {c}->{a.colour}"] += 1
        if a.background != b:
            confusions[f"background {b}->{a.background}"] += 1
        if a.shape != s:
            confusions[f"{s}->{a.shape}"] += 1
    n = len(images)
    return {
        "n": n,
        **{k: round(hits[k] / n, 4) for k in ("background", "colour", "shape", "all")},
        "top_confusions": dict(confusions.most_common(8)),
    }


def vae_round_trip(pipe, count: int = 200, seed: int = 4242) -> dict:
    """Accuracy of the analyser on VAE reconstructions: the ceiling the VAE allows."""
    images, specs = dataset.make_dataset(seed, count)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    with torch.no_grad():
        rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    rec_u8 = ((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    res = score([(s.shape, s.colour, s.background) for s in specs], [Image.fromarray(r) for r in rec_u8])
    res["psnr_db"] = round(float(10 * np.log10(4.0 / ((rec - x) ** 2).mean().item())), 2)
    return res


def variant_prompts(pipe, steps: int, guidance: float, count: int = 48) -> dict:
    """Natural caption variants (articles, word order) scored like the canonical prompts."""
    rng = random.Random(7)
    expected, prompts = [], []
    for _ in range(count):
        sp = dataset.sample_spec(rng)
        expected.append((sp.shape, sp.colour, sp.background))
        prompts.append(
            dataset.caption(sp.shape, sp.colour, sp.background, rng.randrange(1, len(dataset.TEMPLATES)))
        )
    images = generate(pipe, prompts, [9000 + i for i in range(count)], steps, guidance)
    return score(expected, images)


def grid(images: list[Image.Image], columns: int) -> Image.Image:
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (w + 2) + 2, rows * (h + 2) + 2), (128, 128, 128))
    for i, im in enumerate(images):
        sheet.paste(im, (2 + (i % columns) * (w + 2), 2 + (i // columns) * (h + 2)))
    return sheet


def inpaint_check(pipe, steps: int, guidance: float) -> dict:
    """Repaint the left half of a generated image with another prompt; compare change in/out of the mask."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    base = generate(pipe, ["a red circle on a blue background"], [11], steps, guidance)[0]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    inpaint = StableDiffusionInpaintPipeline.from_pipe(pipe)
    inpaint.set_progress_bar_config(disable=True)
    out = inpaint(
        "a yellow square on a green background",
        image=base,
        mask_image=mask,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(12),
        strength=1.0,
    ).images[0]
    overlaid = inpaint.image_processor.apply_overlay(mask, base, out)
    a, b, m = (np.asarray(i, dtype=np.float32) for i in (base, out, mask))
    c = np.asarray(overlaid, dtype=np.float32)
    inside = m > 127
    result = {
        "mean_abs_change_inside_mask": round(float(np.abs(b - a)[inside].mean()), 2),
        "mean_abs_change_outside_mask": round(float(np.abs(b - a)[~inside].mean()), 2),
        "outside_after_overlay": round(float(np.abs(c - a)[~inside].mean()), 2),
    }
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    kept, moved = 0, []
    sources = eval_prompts()[::6]
    prompts = [dataset.caption(*p) for p in sources]
    src_images = generate(pipe, prompts, [21 + i for i in range(len(prompts))], steps, guidance)
    for i, (p, src) in enumerate(zip(prompts, src_images, strict=True)):
        var = img2img(
            p,
            image=src,
            strength=0.5,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(500 + i),
        ).images[0]
        sa, va = analyse(src), analyse(var)
        kept += (sa.background, sa.colour, sa.shape) == (va.background, va.colour, va.shape)
        moved.append(float(np.abs(np.asarray(var, np.float32) - np.asarray(src, np.float32)).mean()))
    result["img2img_strength_0.5_same_analysis"] = round(kept / len(prompts), 3)
    result["img2img_mean_abs_change"] = round(statistics.mean(moved), 2)
    return result, [base, mask.convert("RGB"), out, overlaid]


def latency(pipe, steps: int, guidance: float) -> dict:
    def timed(n: int, repeats: int) -> float:
        runs = []
        for r in range(repeats):
            t = time.perf_counter()
            generate(
                pipe,
                ["a red circle on a blue background"] * n,
                [r * 10 + i for i in range(n)],
                steps,
                guidance,
                batch=n,
            )
            runs.append(time.perf_counter() - t)
        return statistics.median(runs)

    timed(1, 1)  # warm-up: first calls allocate and pick kernels
    one = timed(1, 7)
    eight = timed(8, 3)
    return {
        "threads": torch.get_num_threads(),
        "steps": steps,
        "guidance": guidance,
        "single_image_s": round(one, 3),
        "batch8_s": round(eight, 3),
        "batch8_per_image_s": round(eight / 8, 3),
        "batch8_throughput_gain": round(8 * one / eight, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=WEIGHTS, help="pipeline folder (default: shipped weights)")
    p.add_argument("--out", type=Path, default=Path("data/eval"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seeds", type=int, default=2, help="seeds per prompt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--quick", action="store_true", help="one seed, no variants/inpaint/latency (for experiments)"
    )
    p.add_argument("--no-latency", action="store_true")
    p.add_argument(
        "--cache",
        default="fast,faster",
        help="step-cache levels to compare with the uncached images, comma-separated ('' for none)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not (args.weights / "model_index.json").exists():
        p.error(
            f"--weights {args.weights} is not a pipeline folder (no model_index.json); run make train-model"
        )
    pipe = load_pipeline(args.weights)
    args.out.mkdir(parents=True, exist_ok=True)
    seeds_per = 1 if args.quick else args.seeds
    expected = [e for e in eval_prompts() for _ in range(seeds_per)]
    prompts = [dataset.caption(*e) for e in expected]
    seeds = [1000 + (i % seeds_per) for i in range(len(expected))]
    t = time.time()
    images = generate(pipe, prompts, seeds, args.steps, args.guidance)
    results: dict = {
        "weights": str(args.weights),
        "steps": args.steps,
        "guidance": args.guidance,
        "prompts": score(expected, images),
        "generate_s": round(time.time() - t, 1),
    }
    print(
        f"prompts ({results['prompts']['n']} images, {args.steps} steps, guidance {args.guidance}): "
        f"background {results['prompts']['background']:.1%}  shape colour {results['prompts']['colour']:.1%}  "
        f"shape kind {results['prompts']['shape']:.1%}  all three {results['prompts']['all']:.1%}"
    )
    print(f"  top confusions: {results['prompts']['top_confusions']}")
    levels = [lv for lv in args.cache.split(",") if lv and lv != "off"]
    if levels:
        print("step caching (same prompts and seeds):")
        results["cache"] = cache_comparison(
            pipe, levels, expected, prompts, seeds, args.steps, args.guidance, images
        )
    first_seed = images[::seeds_per]
    sheet = grid(first_seed, columns=16)
    sheet.save(args.out / "grid.png")
    if not args.quick:
        results["vae_round_trip"] = vae_round_trip(pipe)
        v = results["vae_round_trip"]
        print(
            f"VAE round trip ({v['n']} dataset images, {v['psnr_db']} dB): background {v['background']:.1%}  "
            f"shape colour {v['colour']:.1%}  shape kind {v['shape']:.1%}"
        )
        results["variants"] = variant_prompts(pipe, args.steps, args.guidance)
        v = results["variants"]
        print(
            f"caption variants ({v['n']} images): background {v['background']:.1%}  "
            f"shape colour {v['colour']:.1%}  shape kind {v['shape']:.1%}"
        )
        results["edit"], edit_images = inpaint_check(pipe, args.steps, args.guidance)
        grid(edit_images, columns=4).save(args.out / "inpaint.png")
        print(f"inpaint/img2img: {results['edit']}")
        if not args.no_latency:
            results["latency"] = latency(pipe, args.steps, args.guidance)
            print(f"latency: {results['latency']}")
        if args.weights.resolve() == WEIGHTS.resolve():
            shutil.copyfile(args.out / "grid.png", PACKAGE_GRID)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out / 'grid.png'} and {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
