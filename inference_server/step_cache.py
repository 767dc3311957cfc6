"""Step caching: reuse work from earlier denoising steps to make one image cheaper.

Consecutive denoising steps change the network's deep features little, so part of the work of one
step can stand in for the next. Two methods, one per kind of denoiser:

- UNet models (the embedded model, SD 1.x/2.x, SDXL): DeepCache (Ma et al., 2023,
  https://github.com/horseee/DeepCache). On the steps a schedule names (`unet_full_step`) the whole
  UNet runs and the input of one of its last up blocks is kept (the deep features that come up
  through the network). The other steps run only the shallow path: the time embedding, `conv_in`,
  the highest-resolution part of the down path, the last up blocks from the kept block on (fed the
  cached deep features and fresh skip connections) and the output layers. The depth says how many
  up blocks that is: 1 is DeepCache's shallowest branch (on SD 1.5 a few percent of the UNet's
  cost); the levels use 2, which kept the embedded model's pictures far better (docs/performance.md).
- Transformer models (SD 3.x, FLUX.1): first-block cache (FBCache, from ParaAttention; the idea of
  TeaCache, Liu et al., 2024). Every step runs the first transformer block; when its residual (output
  minus input) differs from the one of the last fully computed step by less than `threshold`
  (relative mean absolute difference), the remaining blocks are skipped and the residual they added
  on that step is added again.

Levels are named, so a request or `[model] cache` asks for an outcome, not for a method's knobs;
`LEVELS` says what each does. The hooks are installed for one pipeline call (`step_cache`) and
removed afterwards, so calls at different levels share the same modules, and the state of one call
(the cached features) never leaks into the next. Own code rather than cache-dit: docs/performance.md
says why.

torch is imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CacheLevel:
    name: str
    # UNet (DeepCache): which steps run the whole network, the others the shallow path
    # (`unet_full_step`): the first `unet_warmup` of the steps, then one step in `unet_interval`
    # (1 = every step: no caching). The shallow path runs the last `unet_depth` up blocks (and the
    # down path that feeds them skip connections): 1 is DeepCache's shallowest branch.
    unet_interval: int
    unet_warmup: float
    unet_depth: int
    # Transformers (first-block cache): skip the other blocks while the first block's residual
    # changed by less than this fraction since the last full step (0 = never skip).
    transformer_threshold: float
    summary: str


# The levels, cheapest last. The transformer thresholds are in the range the FBCache authors report
# as near-lossless on FLUX.1 (0.08-0.12). The UNet schedules come from a search on the embedded model
# at 20 steps (`tests/bench/cache_search.py`, docs/performance.md): there DeepCache's shallowest
# branch (depth 1) lost colour and shape even with 13 of 20 steps in full, while recomputing the two
# highest-resolution levels (depth 2) kept them with 9; the first steps, where a picture's layout
# and colours form, run in full. Neither level reaches issue 22's 1.8x on that small UNet (a cached
# step still costs half a full one at depth 2), which is why `[model] cache` defaults to "off".
LEVELS: dict[str, CacheLevel] = {
    "off": CacheLevel(
        "off", 1, 0.0, 1, 0.0, "every step runs the whole network (bit-identical to no caching)"
    ),
    "fast": CacheLevel(
        "fast",
        4,
        0.3,
        2,
        0.08,
        "UNet: the first 30% of the steps in full, then a full step every 4 steps, the two "
        "highest-resolution levels only in between; transformer: skip the other blocks while the "
        "first block's residual changed by < 8%",
    ),
    "faster": CacheLevel(
        "faster",
        5,
        0.15,
        2,
        0.15,
        "UNet: the first 15% of the steps in full, then a full step every 5 steps; transformer: skip "
        "while the change is < 15%",
    ),
}
CACHE_LEVELS: tuple[str, ...] = tuple(LEVELS)
# The level the cache bench holds to issue 22's speed goal (1.8x images/s of "off").
RECOMMENDED_LEVEL = "faster"


def level_problem(name: str) -> str | None:
    """Why `name` is not a cache level, or None."""
    if name in LEVELS:
        return None
    return f"must be one of {', '.join(CACHE_LEVELS)}, got {name!r}"


@contextlib.contextmanager
def step_cache(pipe: Any, level: str, steps: int) -> Iterator[None]:
    """Within the block, `pipe`'s denoiser caches at `level` (one pipeline call's worth of state);
    `steps` is the number of denoising steps the call makes.

    "off" changes nothing. Runs on the pipeline's worker thread, like the call it wraps.
    """
    spec = LEVELS[level]
    if level == "off":
        yield
        return
    unet = getattr(pipe, "unet", None)
    transformer = getattr(pipe, "transformer", None)
    if unet is not None:
        with deep_cache(unet, lambda step: unet_full_step(level, step, steps), spec.unet_depth):
            yield
    elif transformer is not None:
        with first_block_cache(transformer, spec.transformer_threshold):
            yield
    else:
        raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer to cache")


def unet_full_step(level: str, step: int, steps: int) -> bool:
    """Whether step `step` (0-based) of a `steps`-step denoising runs the whole UNet at `level` (else
    the shallow path, from the deep features of the last full step).

    A plain function of the step and the step count, so that a caller holding many samples at
    different steps (the continuous engine) can ask it per sample. Step 0 always runs in full:
    nothing is cached yet.
    """
    spec = LEVELS[level]
    warm = warmup_steps(spec, steps)
    return (
        step < warm
        # the warm-up's last step counts as the first full step of the cycle
        or (step - warm + 1) % spec.unet_interval == 0
    )


def full_steps(level: str, steps: int) -> int:
    """How many of `steps` steps run the whole UNet at `level`."""
    return sum(unet_full_step(level, step, steps) for step in range(steps))


def warmup_steps(spec: CacheLevel, steps: int) -> int:
    """How many of a call's first steps run in full at this level (at least one: nothing is cached yet)."""
    return max(1, math.ceil(spec.unet_warmup * steps))


# -- DeepCache for UNet2DConditionModel ----------------------------------------------------------


class DeepCacheState:
    """One pipeline call's DeepCache state: the step counter and the cached deep features."""

    def __init__(self) -> None:
        self.calls = 0
        self.deep: Any = None  # the cached up block's input on the last full step
        self.full_steps = 0
        self.shallow_steps = 0


@contextlib.contextmanager
def deep_cache(unet: Any, full_step: Callable[[int], bool], depth: int = 1) -> Iterator[DeepCacheState]:
    """Run `unet` with DeepCache for the duration of the block (see the module docstring):
    its n-th call (0-based: the step) runs in full when `full_step(n)` says so or nothing is cached;
    the others run `shallow_forward` at `depth`."""
    state = DeepCacheState()

    def keep_input(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        state.deep = args[0] if args else kwargs["hidden_states"]

    original = unet.forward

    def forward(sample: Any, timestep: Any, encoder_hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        full = state.deep is None or full_step(state.calls) or not _plain_call(args, kwargs)
        state.calls += 1
        if full:
            state.full_steps += 1
            handle = cached_block(unet, depth).register_forward_pre_hook(keep_input, with_kwargs=True)
            try:
                return original(sample, timestep, encoder_hidden_states, *args, **kwargs)
            finally:
                handle.remove()
        state.shallow_steps += 1
        return shallow_forward(
            unet, state.deep, sample, timestep, encoder_hidden_states, depth=depth, **kwargs
        )

    with _patched({unet: forward}):
        yield state


def _plain_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a UNet call carries nothing the shallow path can't honour (ControlNet or adapter
    residuals, attention masks): such a step runs in full."""
    if args:
        return False
    unsupported = (
        "class_labels",
        "attention_mask",
        "encoder_attention_mask",
        "down_block_additional_residuals",
        "mid_block_additional_residual",
        "down_intrablock_additional_residuals",
    )
    return all(kwargs.get(name) is None for name in unsupported)


def shallow_forward(
    unet: Any,
    deep: Any,
    sample: Any,
    timestep: Any,
    encoder_hidden_states: Any,
    *,
    depth: int = 1,
    timestep_cond: Any = None,
    cross_attention_kwargs: dict[str, Any] | None = None,
    added_cond_kwargs: dict[str, Any] | None = None,
    return_dict: bool = True,
    **_: Any,
) -> Any:
    """The UNet's output from cached deep features: `UNet2DConditionModel.forward` (diffusers 0.42)
    with everything that feeds the `depth`-th last up block from below replaced by `deep` (that up
    block's input on the step the features were kept, see `cached_block`). What runs: the time
    embedding, `conv_in`, the down path as far as those up blocks take skip connections from, the
    last `depth` up blocks and the output layers."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, timestep_cond)
    aug_emb = unet.get_aug_embed(
        emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs or {}
    )
    emb = emb + aug_emb if aug_emb is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(
        encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs or {}
    )
    depth = min(depth, len(unet.up_blocks))
    ups = list(unet.up_blocks)[-depth:]
    # The up blocks that run take their skip connections from the end of the down path's outputs,
    # which start at full resolution: run the down path until there are that many, no further.
    needed = sum(len(block.resnets) for block in ups)
    cross = dict(encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=cross_attention_kwargs)
    hidden = unet.conv_in(sample)
    skips: tuple[Any, ...] = (hidden,)
    for block in unet.down_blocks:
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        for resnet, attention in zip(block.resnets, attentions, strict=True):
            if len(skips) < needed:
                hidden = resnet(hidden, emb)
                if attention is not None:
                    hidden = attention(hidden, **cross, return_dict=False)[0]
                skips += (hidden,)
        if len(skips) < needed and block.downsamplers is not None:
            for downsampler in block.downsamplers:
                hidden = downsampler(hidden)
            skips += (hidden,)
    # As UNet2DConditionModel.forward: up-sample to the skip connection's size when the latent's
    # size is not a multiple of the UNet's overall down-sampling.
    factor = 2**unet.num_upsamplers
    odd_size = any(side % factor != 0 for side in sample.shape[-2:])
    hidden = deep
    for i, block in enumerate(ups):
        res, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]
        upsample_size = skips[-1].shape[2:] if odd_size and i < len(ups) - 1 else None
        if getattr(block, "has_cross_attention", False):
            hidden = block(
                hidden_states=hidden,
                temb=emb,
                res_hidden_states_tuple=res,
                upsample_size=upsample_size,
                **cross,
            )
        else:
            hidden = block(
                hidden_states=hidden, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size
            )
    if unet.conv_norm_out:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    out = unet.conv_out(hidden)
    return UNet2DConditionOutput(sample=out) if return_dict else (out,)


def cached_block(unet: Any, depth: int) -> Any:
    """The up block whose input DeepCache keeps at `depth` (1 = the last up block)."""
    return unet.up_blocks[-min(depth, len(unet.up_blocks))]


# -- first-block cache for transformers (SD3Transformer2DModel, FluxTransformer2DModel) ------------


class _Residuals:
    """The first-block-cache state of one stream of calls (one per conditioning, see below)."""

    def __init__(self) -> None:
        self.head_residual: Any = None  # first block's residual on the last full step
        self.head_output: tuple[Any, Any] | None = None
        self.tail_residual: tuple[Any, Any] | None = None  # what the other blocks added then
        self.skip = False


class FirstBlockCacheState:
    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.streams: dict[int, _Residuals] = {}
        self.current: _Residuals = _Residuals()
        self.full_steps = 0
        self.cached_steps = 0


@contextlib.contextmanager
def first_block_cache(transformer: Any, threshold: float) -> Iterator[FirstBlockCacheState]:
    """Run `transformer` with a first-block cache for the duration of the block.

    Every block of SD 3 and FLUX.1 is called with keyword arguments and returns
    `(encoder_hidden_states, hidden_states)` (SD 3's last block returns None for the first).
    """
    state = FirstBlockCacheState(threshold)
    blocks = [*transformer.transformer_blocks, *getattr(transformer, "single_transformer_blocks", [])]
    if len(blocks) < 2:  # nothing after the first block to skip
        yield state
        return
    head, middle, tail = blocks[0], blocks[1:-1], blocks[-1]
    original_forward = transformer.forward
    original_head = head.forward

    def model_forward(*args: Any, **kwargs: Any) -> Any:
        # FLUX with true CFG calls the transformer twice per step (prompt, then negative prompt),
        # each with its own text embeddings, fixed for the whole pipeline call: each gets its state.
        context = kwargs.get("encoder_hidden_states")
        key = context.data_ptr() if context is not None else 0
        state.current = state.streams.setdefault(key, _Residuals())
        return original_forward(*args, **kwargs)

    def head_forward(**kwargs: Any) -> Any:
        s = state.current
        encoder, hidden = original_head(**kwargs)
        residual = hidden - kwargs["hidden_states"]
        s.skip = (
            s.head_residual is not None
            and s.tail_residual is not None
            and reuses_residual(state.threshold, residual, s.head_residual)
        )
        if s.skip:
            state.cached_steps += 1
            assert s.tail_residual is not None
            hidden_rest, encoder_rest = s.tail_residual
            encoder = encoder + encoder_rest if encoder_rest is not None and encoder is not None else encoder
            return encoder, hidden + hidden_rest
        state.full_steps += 1
        s.head_residual = residual
        s.head_output = (encoder, hidden)
        return encoder, hidden

    def passthrough(block: Any, is_tail: bool) -> Any:
        original = block.forward

        def forward(**kwargs: Any) -> Any:
            s = state.current
            if s.skip:
                return kwargs.get("encoder_hidden_states"), kwargs["hidden_states"]
            encoder, hidden = original(**kwargs)
            if is_tail:
                assert s.head_output is not None
                head_encoder, head_hidden = s.head_output
                encoder_rest = None if encoder is None or head_encoder is None else encoder - head_encoder
                s.tail_residual = (hidden - head_hidden, encoder_rest)
            return encoder, hidden

        return forward

    patches = {transformer: model_forward, head: head_forward, tail: passthrough(tail, is_tail=True)}
    patches |= {block: passthrough(block, is_tail=False) for block in middle}
    with _patched(patches):
        yield state


@contextlib.contextmanager
def _patched(forwards: dict[Any, Any]) -> Iterator[None]:
    """Each module's `forward` replaced for the block, then put back as it was (an instance
    attribute that offloading hooks set stays; otherwise the class's forward serves again)."""
    saved = {module: module.__dict__.get("forward") for module in forwards}
    for module, forward in forwards.items():
        module.forward = forward
    try:
        yield
    finally:
        for module, before in saved.items():
            if before is None:
                del module.forward
            else:
                module.forward = before


def _relative_change(now: Any, before: Any) -> float:
    return float(((now - before).abs().mean() / before.abs().mean().clamp_min(1e-12)).item())


def reuses_residual(threshold: float, residual: Any, cached_residual: Any) -> bool:
    """The first-block cache's rule, in both engines: the other blocks are skipped when the first
    block's residual changed by less than `threshold` since the last fully computed step (a
    threshold of 0 never skips; a relative change is never negative)."""
    return threshold > 0 and _relative_change(residual, cached_residual) < threshold


# -- per-sample schedules (the continuous engine keeps one cache state per image) -----------------


def transformer_reuses(level: str, residual: Any, cached_residual: Any) -> bool:
    """Whether the first-block cache at `level` skips the other blocks, given the first block's
    residual now and on the last fully computed step (the rule `first_block_cache` applies)."""
    return reuses_residual(LEVELS[level].transformer_threshold, residual, cached_residual)
