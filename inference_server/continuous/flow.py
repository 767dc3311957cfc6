"""Flow-matching transformer families for the continuous engine: SD 3.x and FLUX.1.

They follow `StableDiffusion3{,Img2Img,Inpaint}Pipeline` and `Flux{,Img2Img,Inpaint}Pipeline` for a
batch of one. Each sample has its own `FlowMatchEulerDiscreteScheduler`, set up as its pipeline does
(`retrieve_timesteps`, with SD3's dynamic shift when the scheduler asks for it and FLUX's explicit
sigmas and resolution-dependent shift `mu`), so samples of different sizes, step counts and
strengths each keep their own sigmas; the transformer takes one timestep per row.

- SD 3.x: two CLIP encoders and T5 (or zeros in T5's place when the model was loaded without it),
  pooled projections, classifier-free guidance rows. img2img and inpaint keep `steps * strength`
  steps without rounding it first (unlike SD/SDXL), and noise with `scale_noise`.
- FLUX.1: latents packed 2x2 into tokens, latent image ids and text ids (shared by a call, so only
  samples of one size share one), dev's distilled guidance as a per-row embedding (one pass),
  schnell none; a negative prompt only through true CFG (`true_cfg` > 1: a negative row per sample).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from inference_server.continuous.caching import Unit, first_block_splice
from inference_server.continuous.denoiser import (
    Blend,
    Denoiser,
    Prompt,
    Start,
    TextEmbedder,
    randn,
    repeat_latents,
    row_times,
    stack_rows,
)
from inference_server.engine import Task

if TYPE_CHECKING:
    from inference_server.continuous.core import ContinuousRequest, _Sample


class FlowDenoiser(Denoiser):
    """What SD 3.x and FLUX.1 share: flow-matching schedules and a shifted, scaled 16-channel VAE."""

    pipeline_step_kwargs = False  # their pipelines call scheduler.step(pred, t, latents) only

    def effective_steps(self, steps: int, strength: float, task: Task) -> int:
        if task == "txt2img":
            return steps
        return steps - self._t_start(steps, strength)

    # First-block cache decisions: per sample over all its rows (SD 3's pipeline passes a sample's
    # unconditional and conditional rows in one call), or per row (FLUX's calls the transformer once
    # per conditioning), as the request-level engine's first-block cache sees them.
    cache_rows_apart = False

    def predict_cached(self, samples: list[_Sample]) -> torch.Tensor:
        """`predict` with a first-block cache per sample (continuous/caching.py)."""
        units, row = [], 0
        for s in samples:
            c = s.cache
            per_unit = 1 if self.cache_rows_apart else s.prompt.rows
            for k in range(s.prompt.rows // per_unit):
                rows = slice(row, row + per_unit)
                stream = c.stream(k) if c is not None else None
                units.append(Unit(rows=rows, level=c.level if c else "off", stream=stream, cache=c))
                row += per_unit
        with first_block_splice(self.pipe.transformer, units) as commit:
            out = self.predict(samples)
        commit()
        return out

    @staticmethod
    def _t_start(steps: int, strength: float) -> int:
        # SD3/FLUX img2img get_timesteps: `steps * strength` is not rounded before subtracting.
        init_timestep = min(steps * strength, steps)
        return int(max(steps - init_timestep, 0))

    def renoise(
        self, scheduler: Any, image_latents: torch.Tensor, noise: torch.Tensor, t: Any
    ) -> torch.Tensor:
        return scheduler.scale_noise(image_latents, torch.tensor([t]), noise)

    def encode_image(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        vae = self.pipe.vae
        latents = vae.encode(image).latent_dist.sample(generator)
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    def retrieve_timesteps(
        self, scheduler: Any, request: ContinuousRequest, **kwargs: Any
    ) -> tuple[Any, int]:
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

        timesteps, steps = retrieve_timesteps(scheduler, request.steps, self.pipe._execution_device, **kwargs)
        if request.task == "txt2img":
            return timesteps, steps
        t_start = self._t_start(steps, request.strength)
        timesteps = scheduler.timesteps[t_start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
        return timesteps, steps - t_start

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.pipe.vae.config
        return latents / config.scaling_factor + config.shift_factor

    def prepare_image(self, request: ContinuousRequest, dtype: torch.dtype) -> torch.Tensor:
        image = self.pipe.image_processor.preprocess(
            request.image,
            height=request.height,
            width=request.width,
            crops_coords=None,
            resize_mode="default",
        ).to(dtype=torch.float32)
        return image.to(device=self.pipe._execution_device, dtype=dtype)

    def mask(self, request: ContinuousRequest) -> torch.Tensor:
        return self.pipe.mask_processor.preprocess(
            request.mask, height=request.height, width=request.width, resize_mode="default", crops_coords=None
        )


class SD3Denoiser(FlowDenoiser):
    """SD 3.x: SD3Transformer2DModel (MMDiT), 16-channel latents, 2x2 patches."""

    family = "sd3"

    @property
    def size_multiple(self) -> int:
        return int(self.pipe.vae_scale_factor) * int(self.pipe.transformer.config.patch_size)

    def encode_text(self, text: str) -> tuple[torch.Tensor, ...]:
        pipe = self.pipe
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=text,
            prompt_2=None,
            prompt_3=None,
            device=pipe._execution_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        return embeds, pooled

    def encode(self, request: ContinuousRequest, embed: TextEmbedder) -> Prompt:
        cond, pooled = embed(request.prompt)
        if request.guidance <= 1.0:
            return Prompt(rows=1, tensors={"hidden": cond, "pooled": pooled})
        # The pipeline encodes the negative prompt ("" when absent) exactly as a prompt.
        uncond, uncond_pooled = embed(request.negative_prompt or "")
        return Prompt(
            rows=2,
            tensors={"hidden": torch.cat([uncond, cond]), "pooled": torch.cat([uncond_pooled, pooled])},
        )

    def prepare(
        self, request: ContinuousRequest, prompt: Prompt, scheduler: Any, generator: torch.Generator
    ) -> Start:
        pipe, req = self.pipe, request
        device = pipe._execution_device
        dtype = prompt.tensors["hidden"].dtype
        f = pipe.vae_scale_factor
        shape = (1, pipe.transformer.config.in_channels, req.height // f, req.width // f)
        kwargs: dict[str, Any] = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            patch = pipe.transformer.config.patch_size
            config = scheduler.config
            kwargs["mu"] = calculate_shift(
                (shape[2] // patch) * (shape[3] // patch),
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        if req.task == "txt2img":
            latents = randn(shape, generator, device, dtype)
            timesteps, num_steps = self.retrieve_timesteps(scheduler, req, **kwargs)
            return Start(latents=latents, timesteps=timesteps, num_steps=num_steps)
        timesteps, num_steps = self.retrieve_timesteps(scheduler, req, **kwargs)
        start = timesteps[:1].repeat(1)
        if req.task == "img2img":
            # StableDiffusion3Img2ImgPipeline.prepare_latents: VAE sample, noise, scale_noise.
            image = pipe.image_processor.preprocess(req.image, height=req.height, width=req.width)
            init = self.encode_image(image.to(device=device, dtype=dtype), generator)
            noise = randn(init.shape, generator, device, dtype)
            latents = scheduler.scale_noise(init, start, noise)
            return Start(latents=latents, timesteps=timesteps, num_steps=num_steps)
        # StableDiffusion3InpaintPipeline (16-channel transformer): image latents, noise, then the
        # masked image's latents, which only a 33-channel transformer reads: draw, don't encode.
        image_latents = self.encode_image(self.prepare_image(req, dtype), generator)
        noise = randn(shape, generator, device, dtype)
        latents = noise if req.strength == 1.0 else scheduler.scale_noise(image_latents, start, noise)
        mask_condition = self.mask(req)
        randn(image_latents.shape, generator, device, image_latents.dtype)
        mask = torch.nn.functional.interpolate(mask_condition, size=(req.height // f, req.width // f))
        blend = Blend(image_latents=image_latents, noise=noise, mask=mask.to(device=device, dtype=dtype))
        return Start(latents=latents, timesteps=timesteps, num_steps=num_steps, blend=blend)

    def predict(self, samples: list[_Sample]) -> torch.Tensor:
        x = repeat_latents(samples)
        return self.pipe.transformer(
            hidden_states=x,
            # StableDiffusion3Pipeline passes the scheduler's float32 timesteps as they are.
            timestep=row_times(samples).to(x.device),
            encoder_hidden_states=stack_rows(samples, "hidden"),
            pooled_projections=stack_rows(samples, "pooled"),
            return_dict=False,
        )[0]

    def vae_input(self, sample: _Sample) -> torch.Tensor:
        if sample.ticket.request.task == "inpaint":
            # diffusers 0.42's StableDiffusion3InpaintPipeline decodes `latents / scaling_factor`
            # without adding the VAE's shift_factor (its txt2img and img2img pipelines add it); the
            # request-level engine runs that pipeline, so both engines give the same image.
            return sample.latents / self.pipe.vae.config.scaling_factor
        return self.unscale(sample.latents)


class FluxDenoiser(FlowDenoiser):
    """FLUX.1 dev and schnell: FluxTransformer2DModel over packed 2x2 latent tokens."""

    family = "flux"
    cache_rows_apart = True

    @property
    def size_multiple(self) -> int:
        return int(self.pipe.vae_scale_factor) * 2

    def encode_text(self, text: str) -> tuple[torch.Tensor, ...]:
        pipe = self.pipe
        embeds, pooled, text_ids = pipe.encode_prompt(
            prompt=text, prompt_2=None, device=pipe._execution_device, num_images_per_prompt=1
        )
        return embeds, pooled, text_ids

    def true_cfg(self, request: ContinuousRequest) -> bool:
        # FluxPipeline: true CFG when `true_cfg_scale > 1` and a negative prompt was passed at all.
        return request.true_cfg is not None and request.true_cfg > 1 and request.negative_prompt is not None

    def encode(self, request: ContinuousRequest, embed: TextEmbedder) -> Prompt:
        cond, pooled, text_ids = embed(request.prompt)
        if not self.true_cfg(request):
            return Prompt(rows=1, tensors={"hidden": cond, "pooled": pooled}, shared={"txt_ids": text_ids})
        assert request.negative_prompt is not None  # true_cfg() says so
        uncond, uncond_pooled, _ = embed(request.negative_prompt)
        return Prompt(
            rows=2,
            tensors={"hidden": torch.cat([uncond, cond]), "pooled": torch.cat([uncond_pooled, pooled])},
            shared={"txt_ids": text_ids},
        )

    def guide(self, sample: _Sample, pred: torch.Tensor) -> torch.Tensor:
        if sample.prompt.rows == 1:
            return pred  # dev's guidance is embedded; schnell has none
        negative, cond = pred.chunk(2)
        true_cfg = sample.ticket.request.true_cfg
        assert true_cfg is not None
        return negative + true_cfg * (cond - negative)

    def group_key(self, sample: _Sample) -> tuple[Any, ...]:
        # img ids follow the size and txt ids the text sequence length: one of each per call.
        return (*sample.size, sample.prompt.shared["txt_ids"].shape[0])

    def prepare(
        self, request: ContinuousRequest, prompt: Prompt, scheduler: Any, generator: torch.Generator
    ) -> Start:
        pipe, req = self.pipe, request
        device = pipe._execution_device
        dtype = prompt.tensors["hidden"].dtype
        f = pipe.vae_scale_factor
        # 8x VAE, then 2x2 packing: the latent sides are even.
        h, w = 2 * (req.height // (f * 2)), 2 * (req.width // (f * 2))
        channels = pipe.transformer.config.in_channels // 4
        shape = (1, channels, h, w)
        sigmas: Any = np.linspace(1.0, 1 / req.steps, req.steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = scheduler.config
        mu = calculate_shift(
            (h // 2) * (w // 2),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        img_ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, device, dtype)
        extra = {"img_ids": img_ids}
        if pipe.transformer.config.guidance_embeds:
            extra["guidance"] = torch.full([1], req.guidance, device=device, dtype=torch.float32)

        def pack(x: torch.Tensor) -> torch.Tensor:
            return pipe._pack_latents(x, 1, channels, h, w)

        if req.task == "txt2img":
            latents = pack(randn(shape, generator, device, dtype))
            timesteps, num_steps = self.retrieve_timesteps(scheduler, req, sigmas=sigmas, mu=mu)
            scheduler.set_begin_index(0)
            return Start(latents=latents, timesteps=timesteps, num_steps=num_steps, extra=extra)
        timesteps, num_steps = self.retrieve_timesteps(scheduler, req, sigmas=sigmas, mu=mu)
        start = timesteps[:1].repeat(1)
        # FluxImg2ImgPipeline / FluxInpaintPipeline.prepare_latents: VAE sample, noise, scale_noise.
        image_latents = self.encode_image(self.prepare_image(req, dtype), generator)
        noise = randn(shape, generator, device, dtype)
        latents = pack(scheduler.scale_noise(image_latents, start, noise))
        if req.task == "img2img":
            return Start(latents=latents, timesteps=timesteps, num_steps=num_steps, extra=extra)
        # FluxInpaintPipeline.prepare_mask_latents: the masked image's latents feed only FLUX Fill
        # models: take the generator's draw without the encoder. The mask is packed like latents.
        mask_condition = self.mask(req)
        randn(image_latents.shape, generator, device, image_latents.dtype)
        mask = torch.nn.functional.interpolate(mask_condition, size=(h, w)).to(device=device, dtype=dtype)
        blend = Blend(
            image_latents=pack(image_latents), noise=pack(noise), mask=pack(mask.repeat(1, channels, 1, 1))
        )
        return Start(latents=latents, timesteps=timesteps, num_steps=num_steps, blend=blend, extra=extra)

    def predict(self, samples: list[_Sample]) -> torch.Tensor:
        x = repeat_latents(samples)
        guidance = None
        if self.pipe.transformer.config.guidance_embeds:
            guidance = torch.cat([s.extra["guidance"].repeat(s.prompt.rows) for s in samples])
        first = samples[0]
        return self.pipe.transformer(
            hidden_states=x,
            # FluxPipeline: the timestep in the latents' dtype, then / 1000.
            timestep=row_times(samples, x.dtype).to(x.device) / 1000,
            guidance=guidance,
            pooled_projections=stack_rows(samples, "pooled"),
            encoder_hidden_states=stack_rows(samples, "hidden"),
            txt_ids=first.prompt.shared["txt_ids"],
            img_ids=first.extra["img_ids"],
            return_dict=False,
        )[0]

    def vae_input(self, sample: _Sample) -> torch.Tensor:
        pipe = self.pipe
        height, width = sample.size
        return self.unscale(pipe._unpack_latents(sample.latents, height, width, pipe.vae_scale_factor))
