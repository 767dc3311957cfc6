"""Model families: what the loaded pipeline is, and so what a request to it may ask for.

`detect_family(pipe)` looks at a loaded diffusers text-to-image pipeline (its denoiser class and
config, its scheduler, its VAE) and returns a `ModelFamily`: the one description that request
validation (`schemas.py`, `validation.py`), the pipeline calls (`pipelines.py`), `/health` and
`/v1/models` (`capabilities()`) and, through those, the bot all read. Nothing about a family is
written down anywhere else.

| family | denoiser | samplers | guidance | negative prompt |
| --- | --- | --- | --- | --- |
| sd | UNet, epsilon (SD 1.x, 2.x-base) | DDPM-family | classifier-free | yes (guidance > 1) |
| sd-v | UNet, v-prediction (SD 2.x-768) | DDPM-family | classifier-free | yes (guidance > 1) |
| sdxl | UNet with added time ids | DDPM-family | classifier-free | yes (guidance > 1) |
| sd3 | SD3Transformer2DModel (MMDiT) | flow matching | classifier-free | yes (guidance > 1) |
| flux-dev | FluxTransformer2DModel, guidance embeds | flow matching | distilled (embedded) | via true CFG |
| flux-schnell | FluxTransformer2DModel, no guidance embeds | flow matching | none (0) | via true CFG |

The size multiple and native size are read from the pipeline (VAE down-sampling x patching; the
size diffusers itself defaults to), so a tiny test pipeline and a real checkpoint of one family are
described by the same code. Importing this module is cheap (no torch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from inference_server.config_loader import ConfigError
from inference_server.engine import TASKS, Task

if TYPE_CHECKING:
    from inference_server.config import ModelConfig

FamilyName = Literal["sd", "sd-v", "sdxl", "sd3", "flux-dev", "flux-schnell"]
# What `guidance` means to the model: classifier-free guidance (two denoiser passes when > 1), a
# value embedded into the denoiser (FLUX.1-dev's distilled guidance, one pass), or nothing.
GuidanceKind = Literal["cfg", "distilled", "none"]
# How a negative prompt is honoured: as CFG's unconditional prompt (so only with guidance > 1), or
# by true classifier-free guidance at `true_cfg` (FLUX: a second transformer pass per step).
NegativePromptKind = Literal["cfg", "true_cfg"]

# Request-selectable samplers: public name -> (diffusers scheduler class name, extra config).
# "default" keeps the class the model was saved with. A sampler is built with
# `Cls.from_config(model's scheduler config, **extra)`, so it keeps the model's prediction type
# (epsilon or v) and noise schedule.
DDPM_SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "default": ("", {}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
# Flow-matching models (SD3, FLUX) predict a velocity along a straight path: a DDPM-family sampler
# would read it as noise and produce garbage, so they get flow samplers only. FLUX's pipeline sets
# the timesteps by explicit sigmas and a resolution-dependent shift (`mu`), which only
# FlowMatchEulerDiscreteScheduler takes among diffusers' flow schedulers.
FLOW_SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "default": ("", {}),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),
}
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = DDPM_SAMPLERS | FLOW_SAMPLERS

# FLUX's true-CFG scale when a request has a negative prompt and doesn't say (the value diffusers'
# examples use for true CFG on distilled models).
DEFAULT_TRUE_CFG = 4.0


class UnsupportedModel(ValueError):
    """The loaded pipeline is none of the families the server knows; the message says which it is."""


@dataclass(frozen=True)
class ModelFamily:
    """What one loaded model accepts and defaults to. Hashable: request schemas are built per family."""

    name: FamilyName
    label: str  # for people: "Stable Diffusion XL"
    pipeline: str  # the text-to-image pipeline class, for logs and /health
    size_multiple: int  # width and height must be multiples of this
    native_width: int  # the size the model was trained at (diffusers' default)
    native_height: int
    default_steps: int
    default_guidance: float
    default_strength: float
    samplers: tuple[str, ...]  # valid `scheduler` names, "default" first
    flow_matching: bool
    guidance: GuidanceKind
    negative_prompt: NegativePromptKind
    tasks: tuple[Task, ...] = TASKS
    prediction: str = "epsilon"  # epsilon | v_prediction | flow
    # The size a request without one gets: the native size unless `[model] width`/`height` say
    # otherwise (`with_config`). The bot's `--ar` keeps about this many pixels.
    default_width: int = 0
    default_height: int = 0
    default_sampler: str = "default"
    # `[model] cache`: the step-caching level of requests that don't ask (step_cache.py).
    default_cache: str = "off"

    def __post_init__(self) -> None:
        if not self.default_width:
            object.__setattr__(self, "default_width", self.native_width)
        if not self.default_height:
            object.__setattr__(self, "default_height", self.native_height)

    def with_tasks(self, tasks: Sequence[str]) -> ModelFamily:
        """This family limited to `tasks` (those diffusers has a pipeline for, for this model)."""
        return replace(self, tasks=tuple(t for t in self.tasks if t in tasks))

    def with_config(self, config: ModelConfig) -> ModelFamily:
        """This family with the defaults `[model]` sets, each checked against the family (a
        `ConfigError` naming the key when the model can't honour it)."""
        for key in ("width", "height"):
            value = getattr(config, key)
            if value is not None and value % self.size_multiple:
                raise ConfigError(
                    f"[model] {key}: {value} is not a multiple of {self.size_multiple}, which {self.label} needs"
                )
        if config.scheduler not in self.samplers:
            raise ConfigError(
                f"[model] scheduler: {config.scheduler!r} is not a sampler for {self.label}"
                f"{' (a flow-matching model)' if self.flow_matching else ''}; one of {', '.join(self.samplers)}"
            )
        guidance = self.default_guidance if config.guidance is None else config.guidance
        problem = self.guidance_problem(guidance, explicit=config.guidance is not None)
        if problem is not None:
            raise ConfigError(f"[model] guidance: {problem}")
        return replace(
            self,
            default_width=config.width or self.native_width,
            default_height=config.height or self.native_height,
            default_steps=config.steps or self.default_steps,
            default_guidance=guidance,
            default_strength=config.strength or self.default_strength,
            default_sampler=config.scheduler,
            default_cache=config.cache,
        )

    def size_problem(self, width: int, height: int) -> str | None:
        """Why `width`x`height` can't be generated by this model, or None (bounds are the server's)."""
        m = self.size_multiple
        if width % m or height % m:
            return f"{width}x{height} is not supported by {self.label}: width and height must be multiples of {m}"
        return None

    def guidance_problem(self, guidance: float, explicit: bool) -> str | None:
        """Why `guidance` can't be honoured (None when it can). `explicit`: the client gave it."""
        if self.guidance == "none" and explicit and guidance != 0:
            return f"{self.label} takes no guidance (it is guidance-distilled); leave guidance out or send 0"
        return None

    def negative_prompt_problem(self, negative_prompt: str, guidance: float) -> str | None:
        """Why a negative prompt would be ignored (None when it is honoured or empty)."""
        if negative_prompt and self.negative_prompt == "cfg" and guidance <= 1:
            return (
                f"a negative prompt needs guidance > 1 ({self.label} uses it as classifier-free "
                f"guidance's unconditional prompt), got guidance {guidance:g}"
            )
        return None

    def capabilities(self) -> dict[str, Any]:
        """The family as `/health` and `/v1/models` report it (and the bot reads it)."""
        return {
            "family": self.name,
            "label": self.label,
            "pipeline": self.pipeline,
            "tasks": list(self.tasks),
            "size_multiple": self.size_multiple,
            "native_width": self.native_width,
            "native_height": self.native_height,
            "default_width": self.default_width,
            "default_height": self.default_height,
            "samplers": list(self.samplers),
            "default_sampler": self.default_sampler,
            "flow_matching": self.flow_matching,
            "prediction": self.prediction,
            "guidance": self.guidance,
            "negative_prompt": self.negative_prompt,
            "default_steps": self.default_steps,
            "default_guidance": self.default_guidance,
            "default_strength": self.default_strength,
            "default_true_cfg": DEFAULT_TRUE_CFG if self.negative_prompt == "true_cfg" else None,
        }


# Every size the server takes is a multiple of 8 (`[inference_server] min_side`/`max_side` are), so
# a model whose own multiple is smaller (the embedded model's 4x VAE) is still offered multiples of 8.
SIZE_FLOOR = 8


def _multiple(own: int) -> int:
    return math.lcm(SIZE_FLOOR, own)


def _vae_scale(pipe: Any) -> int:
    factor = getattr(pipe, "vae_scale_factor", None)
    if isinstance(factor, int) and factor > 0:
        return factor
    return int(2 ** (len(pipe.vae.config.block_out_channels) - 1))


def _sample_size(value: Any) -> tuple[int, int]:
    """A config's `sample_size` (an int, or [height, width]) as (height, width)."""
    if isinstance(value, list | tuple):
        return int(value[0]), int(value[-1])
    return int(value), int(value)


def detect_family(pipe: Any) -> ModelFamily:
    """The family of a loaded text-to-image pipeline; `UnsupportedModel` when it is none of ours."""
    pipeline = type(pipe).__name__
    transformer: Any = getattr(pipe, "transformer", None)
    unet: Any = getattr(pipe, "unet", None)
    vae = _vae_scale(pipe)
    if pipeline == "FluxPipeline" and type(transformer).__name__ == "FluxTransformer2DModel":
        # FLUX packs 2x2 latent patches into tokens: sizes are multiples of twice the VAE's factor.
        native = int(pipe.default_sample_size) * vae
        common: dict[str, Any] = {
            "pipeline": pipeline,
            "size_multiple": _multiple(vae * 2),
            "native_width": native,
            "native_height": native,
            "default_strength": 0.6,
            "samplers": tuple(FLOW_SAMPLERS),
            "flow_matching": True,
            "negative_prompt": "true_cfg",
            "prediction": "flow",
        }
        if transformer.config.guidance_embeds:
            return ModelFamily(
                name="flux-dev",
                label="FLUX.1-dev",
                default_steps=28,
                default_guidance=3.5,
                guidance="distilled",
                **common,
            )
        return ModelFamily(
            name="flux-schnell",
            label="FLUX.1-schnell",
            default_steps=4,
            default_guidance=0.0,
            guidance="none",
            **common,
        )
    if pipeline == "StableDiffusion3Pipeline" and type(transformer).__name__ == "SD3Transformer2DModel":
        native = int(pipe.default_sample_size) * vae
        return ModelFamily(
            name="sd3",
            label="Stable Diffusion 3",
            pipeline=pipeline,
            size_multiple=_multiple(vae * int(transformer.config.patch_size)),
            native_width=native,
            native_height=native,
            default_steps=28,
            default_guidance=7.0,
            default_strength=0.6,
            samplers=tuple(FLOW_SAMPLERS),
            flow_matching=True,
            guidance="cfg",
            negative_prompt="cfg",
            prediction="flow",
        )
    if unet is not None and type(unet).__name__ == "UNet2DConditionModel":
        height, width = (side * vae for side in _sample_size(unet.config.sample_size))
        prediction = str(getattr(pipe.scheduler.config, "prediction_type", "epsilon"))
        latent = int(pipe.vae.config.latent_channels)
        # A UNet that also takes the masked image and the mask (2 x latent + 1 channels) is an
        # inpainting checkpoint: it can only inpaint.
        tasks: tuple[Task, ...] = TASKS if unet.config.in_channels == latent else ("inpaint",)
        common = {
            "pipeline": pipeline,
            "size_multiple": _multiple(vae),
            "native_width": width,
            "native_height": height,
            "default_strength": 0.6,
            "samplers": tuple(DDPM_SAMPLERS),
            "flow_matching": False,
            "guidance": "cfg",
            "negative_prompt": "cfg",
            "prediction": prediction,
            "tasks": tasks,
        }
        if unet.config.in_channels in (latent, 2 * latent + 1):
            if pipeline == "StableDiffusionXLPipeline" and unet.config.addition_embed_type == "text_time":
                return ModelFamily(
                    name="sdxl", label="Stable Diffusion XL", default_steps=30, default_guidance=5.0, **common
                )
            if pipeline == "StableDiffusionPipeline" and prediction == "v_prediction":
                return ModelFamily(
                    name="sd-v",
                    label="Stable Diffusion 2.x (v-prediction)",
                    default_steps=20,
                    default_guidance=7.5,
                    **common,
                )
            if pipeline == "StableDiffusionPipeline":
                return ModelFamily(
                    name="sd",
                    label="Stable Diffusion 1.x/2.x",
                    default_steps=20,
                    default_guidance=7.5,
                    **common,
                )
    denoiser = type(transformer or unet).__name__ if (transformer or unet) is not None else "no denoiser"
    raise UnsupportedModel(
        f"{pipeline} ({denoiser}) is not a model family this server serves: it serves Stable Diffusion "
        "1.x/2.x (StableDiffusionPipeline; inpainting checkpoints too), SDXL (StableDiffusionXLPipeline), "
        "SD 3.x (StableDiffusion3Pipeline) and FLUX.1 dev/schnell (FluxPipeline) checkpoints"
    )
