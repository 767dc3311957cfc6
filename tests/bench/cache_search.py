"""The search behind the step-cache levels: `python -m tests.bench.cache_search [NAME ...]`
(`--costs`: what a cached step costs against a full one).

Runs schedule and method variants of step caching on the embedded model and prints, for each, the
accuracy read back by the analyser (background, shape colour, shape kind) and the mean pixel
difference to the uncached images. The set is held out from `make eval-model`'s (48 prompts x seed
2000, where the eval uses seeds 1000 and 1001), so that choosing a level here does not tune it to
the figures the eval reports. docs/performance.md ("What was tried") has the results.

Variants (each names the steps that run the whole UNet, of 20):
- `deep` (DeepCache, as `inference_server/step_cache.py` ships it): the other steps run the shallow
  path from the last full step's deep features; `depth=2` recomputes the two highest-resolution
  levels instead of one (more of the UNet per cached step, so less saving);
- `taylor`: the deep features extrapolated linearly from the last two full steps (TaylorSeer's idea,
  first order) instead of reused as they are;
- `eps`: the whole UNet output of the last full step reused (no UNet at all on a cached step);
- `x0`: the last full step's prediction of the clean latents reused (its noise prediction
  re-derived for the current latents and timestep), for an epsilon-predicting model.

Not a test and not shipped: an experiment harness kept so the figures can be reproduced.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from inference_server.config import EMBEDDED_WEIGHTS
from inference_server.embedded import dataset
from inference_server.embedded.evaluate import eval_prompts, generate, load_pipeline, score
from inference_server.step_cache import unet_full_step

STEPS = 20


def _shipped(level: str) -> set[int]:
    return {step for step in range(STEPS) if unet_full_step(level, step, STEPS)}


def _every(warm: int, interval: int) -> set[int]:
    """The first `warm` steps, then one every `interval` (the shipped levels' form)."""
    return {step for step in range(STEPS) if step < warm or (step - warm + 1) % interval == 0}


# name -> (full steps, method, depth)
VARIANTS: dict[str, tuple[set[int], str, int]] = {
    "fast": (_shipped("fast"), "deep", 1),
    "faster": (_shipped("faster"), "deep", 1),
    "fast+last2": (set(range(6)) | {7, 9, 11, 13, 15, 17, 18, 19}, "deep", 1),
    "late": (set(range(12)) | {14, 17}, "deep", 1),
    "warm4-every2": ({0, 1, 2, 3, 5, 7, 9, 11, 13, 15, 17, 19}, "deep", 1),
    "every3+last2": (set(range(6)) | {8, 11, 14, 17, 18, 19}, "deep", 1),
    "9-full": ({0, 1, 2, 3, 5, 8, 11, 14, 17}, "deep", 1),
    "9-full-last": ({0, 1, 2, 3, 4, 7, 10, 13, 19}, "deep", 1),
    "9-full-taylor": ({0, 1, 2, 3, 5, 8, 11, 14, 17}, "taylor", 1),
    "9-full-depth2": ({0, 1, 2, 3, 5, 8, 11, 14, 17}, "deep", 2),
    "depth2-w6-every3": (_every(6, 3), "deep", 2),
    "depth2-w6-every4": (_every(6, 4), "deep", 2),
    "depth2-w4-every3": (_every(4, 3), "deep", 2),
    "depth2-w4-every4": (_every(4, 4), "deep", 2),
    "depth2-w3-every5": (_every(3, 5), "deep", 2),
    "depth2-w2-every4": (_every(2, 4), "deep", 2),
    "depth2-w2-every6": (_every(2, 6), "deep", 2),
    "depth2-first-only": ({0}, "deep", 2),
    "10-full-eps": ({0, 1, 2, 3, 5, 7, 9, 11, 14, 17}, "eps", 1),
    "10-full-x0": ({0, 1, 2, 3, 5, 7, 9, 11, 14, 17}, "x0", 1),
    "12-full-x0": ({0, 1, 2, 3, 4, 6, 8, 10, 12, 14, 16, 18}, "x0", 1),
}


def shallow(unet: Any, deep: Any, depth: int, sample: Any, timestep: Any, context: Any) -> Any:
    """The UNet's output from `deep`, the input of its `depth`-th last up block (no extra inputs)."""
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=context, added_cond_kwargs={})
    emb = emb + aug if aug is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    hidden = unet.conv_in(sample)
    skips: tuple[Any, ...] = (hidden,)
    need = sum(len(unet.up_blocks[-k].resnets) for k in range(1, depth + 1))
    for block in unet.down_blocks:
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        for resnet, attention in zip(block.resnets, attentions, strict=True):
            if len(skips) < need:
                hidden = resnet(hidden, emb)
                if attention is not None:
                    hidden = attention(hidden, encoder_hidden_states=context, return_dict=False)[0]
                skips += (hidden,)
        if len(skips) < need and block.downsamplers is not None:
            for down in block.downsamplers:
                hidden = down(hidden)
            skips += (hidden,)
    hidden = deep
    for k in range(depth, 0, -1):
        block = unet.up_blocks[-k]
        res, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]
        extra = {"encoder_hidden_states": context} if getattr(block, "has_cross_attention", False) else {}
        hidden = block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res, **extra)
    if unet.conv_norm_out:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    return (unet.conv_out(hidden),)


@contextlib.contextmanager
def variant(pipe: Any, full: set[int], method: str, depth: int) -> Iterator[None]:
    """Patch `pipe.unet` for the block; state restarts with every pipeline call (step 0)."""
    unet = pipe.unet
    original = unet.forward
    alphas = pipe.scheduler.alphas_cumprod
    state: dict[str, Any] = {"calls": 0}

    def keep(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        state["now"] = args[0] if args else kwargs["hidden_states"]

    def forward(sample: Any, timestep: Any, encoder_hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        step = state["calls"] % STEPS
        state["calls"] += 1
        if step == 0:
            state["deep"] = []
        if step in full or not state["deep"]:
            handle = unet.up_blocks[-depth].register_forward_pre_hook(keep, with_kwargs=True)
            try:
                out = original(sample, timestep, encoder_hidden_states, *args, **kwargs)
            finally:
                handle.remove()
            state["deep"] = [*state["deep"], (step, state["now"])][-2:]
            state["out"] = (sample, timestep, out[0])
            return out
        if method in ("eps", "x0"):
            x1, t1, eps1 = state["out"]
            if method == "eps":
                return (eps1,)
            a1, a = alphas[int(t1)], alphas[int(timestep)]
            x0 = (x1 - (1 - a1).sqrt() * eps1) / a1.sqrt()
            return ((sample - a.sqrt() * x0) / (1 - a).sqrt(),)
        last_step, deep = state["deep"][-1]
        if method == "taylor" and len(state["deep"]) == 2:
            first_step, before = state["deep"][0]
            deep = deep + (step - last_step) / (last_step - first_step) * (deep - before)
        return shallow(unet, deep, depth, sample, timestep, encoder_hidden_states)

    unet.forward = forward
    try:
        yield
    finally:
        del unet.forward


def costs(pipe: Any, repeats: int = 20) -> None:
    """CPU seconds of one UNet call in full and of the shallow path at depth 1 and 2 (median of
    `repeats`, interleaved), at 2 rows (one image with CFG) and 16 (eight): the share of a full
    step that a cached step still costs, which bounds the speed-up of any schedule."""
    import functools
    import statistics

    unet = pipe.unet
    for rows in (2, 16):
        x = torch.randn(rows, 4, 16, 16)
        context = torch.randn(rows, 16, unet.config.cross_attention_dim)
        t = torch.tensor(500)
        deep = {}
        for depth in (1, 2):
            box: dict[str, Any] = {}

            def keep(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], box: dict = box) -> None:
                box["deep"] = args[0] if args else kwargs["hidden_states"]

            handle = unet.up_blocks[-depth].register_forward_pre_hook(keep, with_kwargs=True)
            unet(x, t, encoder_hidden_states=context)
            handle.remove()
            deep[depth] = box["deep"]
        calls = {
            "full": functools.partial(unet, x, t, encoder_hidden_states=context),
            "depth 1": functools.partial(shallow, unet, deep[1], 1, x, t, context),
            "depth 2": functools.partial(shallow, unet, deep[2], 2, x, t, context),
        }
        cpu: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(repeats):
            for name, call in calls.items():
                started = time.process_time()
                call()
                cpu[name].append(time.process_time() - started)
        full = statistics.median(cpu["full"])
        print(
            f"{rows:>2} rows: "
            + "  ".join(
                f"{name} {statistics.median(v) * 1000:.0f} ms CPU ({statistics.median(v) / full:.2f})"
                for name, v in cpu.items()
            )
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help=f"variants (default all): {', '.join(VARIANTS)}")
    p.add_argument("--seed", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--costs", action="store_true", help="only the CPU cost of a cached step vs a full one")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(EMBEDDED_WEIGHTS)
    if args.costs:
        with torch.inference_mode():
            costs(pipe)
        return
    expected = eval_prompts()
    prompts = [dataset.caption(*e) for e in expected]
    seeds = [args.seed] * len(expected)
    with torch.inference_mode():
        reference = generate(pipe, prompts, seeds, STEPS, 7.5)
        ref = np.stack([np.asarray(im, np.float32) for im in reference])
        r = score(expected, reference)
        print(
            f"{'off':<16} full 20/20  background {r['background']:6.1%}  shape colour {r['colour']:6.1%}  "
            f"shape kind {r['shape']:6.1%}  ({len(expected)} images, seed {args.seed}, {STEPS} steps)"
        )
        for name in args.names or VARIANTS:
            full, method, depth = VARIANTS[name]
            started = time.time()
            with variant(pipe, full, method, depth):
                images = generate(pipe, prompts, seeds, STEPS, 7.5)
            r = score(expected, images)
            diff = float(np.abs(np.stack([np.asarray(im, np.float32) for im in images]) - ref).mean())
            print(
                f"{name:<16} full {len(full):>2}/20  background {r['background']:6.1%}  shape colour "
                f"{r['colour']:6.1%}  shape kind {r['shape']:6.1%}  mean |pixel diff| {diff:5.2f}/255  "
                f"({method}, depth {depth}; {time.time() - started:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
