"""The per-family half of the continuous engine: what one model family needs at each step.

`core.ContinuousEngine` decides who runs (joins, leaves, priority, failures, OOM); a `Denoiser`
translates between its samples and one model family's diffusers pipeline: how a prompt becomes
conditioning rows, how a sample starts (noise, timesteps, img2img/inpaint latents, in the pipeline's
exact random order), how a batch of samples at different timesteps becomes one denoiser call, how a
prediction becomes the next latents (guidance, scheduler step, inpaint blending) and how latents
become pixels. Subclasses: `unet.UNetDenoiser` (SD 1.x/2.x), `unet.SDXLDenoiser`,
`flow.SD3Denoiser`, `flow.FluxDenoiser`; `families.denoiser_for(pipe)` picks one.

Each sample is a batch of one of the diffusers pipeline with its own scheduler instance and
`torch.Generator`, so its image equals that pipeline's call for its seed whatever shares its steps.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from inference_server.engine import Task

if TYPE_CHECKING:
    from inference_server.continuous.core import ContinuousRequest, _Sample

# Embeddings of one text as the family's encoder returns them (cached per text by the engine).
TextEmbedder = Callable[[str], tuple[torch.Tensor, ...]]


@dataclass(frozen=True, eq=False)
class Prompt:
    """A request's conditioning: `rows` denoiser rows per sample (2 with a negative pass: row 0 the
    negative/unconditional one, row 1 the prompt's), each tensor already stacked in that order.
    `shared` holds what the denoiser takes once per call rather than per row (FLUX's text ids)."""

    rows: int
    tensors: dict[str, torch.Tensor]
    shared: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Blend:
    """Inpainting with a latent-input denoiser: outside the mask, the original noised to the next
    timestep replaces the prediction (as every family's inpaint pipeline does for such a model)."""

    image_latents: torch.Tensor
    noise: torch.Tensor
    mask: torch.Tensor


@dataclass(eq=False)
class Start:
    """Where a sample starts: what `Denoiser.prepare` returns."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    num_steps: int  # pipeline steps (progress units); len(timesteps) = model evaluations
    blend: Blend | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # per-sample conditioning (time ids, ...)


class Denoiser:
    """Base of the per-family adapters; see the module docstring."""

    family = "?"
    # Flow-matching pipelines call `scheduler.step` without eta or generator.
    pipeline_step_kwargs = True

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self._step_kwarg_names: dict[type, set[str]] = {}

    # -- requests -----------------------------------------------------------------------------

    @property
    def size_multiple(self) -> int:
        return int(self.pipe.vae_scale_factor)

    def effective_steps(self, steps: int, strength: float, task: Task) -> int:
        """Steps the pipeline really runs: img2img and inpaint skip the first (1 - strength).

        SD 1.x/2.x and SDXL round the steps kept down (`int(steps * strength)`)."""
        if task == "txt2img":
            return steps
        init_timestep = min(int(steps * strength), steps)
        return steps - max(steps - init_timestep, 0)

    def check(self, request: ContinuousRequest) -> str | None:
        """Why this family can't run `request` (None when it can); sizes are checked by the engine."""
        return None

    def encode(self, request: ContinuousRequest, embed: TextEmbedder) -> Prompt:
        raise NotImplementedError

    def encode_text(self, text: str) -> tuple[torch.Tensor, ...]:
        """The family's text encoders on one text (the engine caches the result per text)."""
        raise NotImplementedError

    def prepare(
        self, request: ContinuousRequest, prompt: Prompt, scheduler: Any, generator: torch.Generator
    ) -> Start:
        raise NotImplementedError

    # -- steps --------------------------------------------------------------------------------

    def group_key(self, sample: _Sample) -> tuple[Any, ...]:
        """Samples with equal keys can share one denoiser call (same latent shape)."""
        return sample.size

    def predict(self, samples: list[_Sample]) -> torch.Tensor:
        """One denoiser call over `samples` (`prompt.rows` rows each, in order) at their timesteps."""
        raise NotImplementedError

    def predict_cached(self, samples: list[_Sample]) -> torch.Tensor:
        """`predict` where some samples step-cache: each reuses work per its own `cache` state and
        level (`caching.py`); uncached samples (`cache` None) compute as in `predict`."""
        raise NotImplementedError

    def guide(self, sample: _Sample, pred: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance over a sample's rows ([uncond, cond])."""
        if sample.prompt.rows == 1:
            return pred
        uncond, cond = pred.chunk(2)
        return uncond + sample.guidance * (cond - uncond)

    def renoise(
        self, scheduler: Any, image_latents: torch.Tensor, noise: torch.Tensor, t: Any
    ) -> torch.Tensor:
        """The original noised to timestep `t` (inpaint blending)."""
        return scheduler.add_noise(image_latents, noise, torch.tensor([t]))

    def step_kwargs(self, scheduler: Any, generator: torch.Generator) -> dict[str, Any]:
        """As the pipelines' prepare_extra_step_kwargs: eta=0.0 and the generator when accepted."""
        if not self.pipeline_step_kwargs:
            return {}
        names = self._step_kwarg_names.get(type(scheduler))
        if names is None:
            names = set(inspect.signature(scheduler.step).parameters)
            self._step_kwarg_names[type(scheduler)] = names
        kwargs: dict[str, Any] = {}
        if "eta" in names:
            kwargs["eta"] = 0.0
        if "generator" in names:
            kwargs["generator"] = generator
        return kwargs

    # -- images -------------------------------------------------------------------------------

    def vae_input(self, sample: _Sample) -> torch.Tensor:
        """A finished sample's latents as its pipeline hands them to the VAE decoder (unscaled,
        unpacked): per sample, since pipelines of one family differ here (SD3's inpaint one)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Same-size `vae_input`s to images in [-1, 1] (the VAE's output, before post-processing)."""
        vae = self.pipe.vae
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0]

    def postprocess(self, image: torch.Tensor) -> Any:
        return self.pipe.image_processor.postprocess(
            image, output_type="np", do_denormalize=[True] * image.shape[0]
        )

    def numpy_to_pil(self, arrays: Any) -> Any:
        return self.pipe.image_processor.numpy_to_pil(arrays)


def randn(
    shape: tuple[int, ...], generator: torch.Generator, device: Any, dtype: torch.dtype
) -> torch.Tensor:
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(shape, generator=generator, device=torch.device(device), dtype=dtype)


def row_times(samples: list[_Sample], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Each sample's current timestep repeated for its rows: one tensor for the batched call."""
    times = [torch.full((s.prompt.rows,), float(s.timesteps[s.i]), dtype=dtype) for s in samples]
    return torch.cat(times)


def stack_rows(samples: list[_Sample], name: str) -> torch.Tensor:
    return torch.cat([s.prompt.tensors[name] for s in samples])


def repeat_latents(samples: list[_Sample]) -> torch.Tensor:
    return torch.cat(
        [torch.cat([s.latents] * s.prompt.rows) if s.prompt.rows > 1 else s.latents for s in samples]
    )
