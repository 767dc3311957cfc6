"""UNet families for the continuous engine: SD 1.x/2.x (`UNetDenoiser`) and SDXL (`SDXLDenoiser`).

They follow `StableDiffusion{,Img2Img,Inpaint}Pipeline` and `StableDiffusionXL{,Img2Img,Inpaint}Pipeline`
for a batch of one: every DDPM-family sampler, classifier-free guidance rows per sample, img2img from
the request's `strength` timestep, inpainting with a 4-channel UNet by latent blending. SDXL adds two
text encoders (penultimate hidden states side by side, the second one's pooled projection) and six
"time ids" per row (original size, crop corner, target size), which the UNet embeds with the timestep.
"""

from __future__ import annotations

import copy
import threading
from typing import TYPE_CHECKING, Any

import torch

from inference_server.continuous.denoiser import (
    Blend,
    Denoiser,
    Prompt,
    Start,
    TextEmbedder,
    randn,
    row_times,
    stack_rows,
)
from inference_server.step_cache import LEVELS, cached_block, shallow_forward, unet_full_step

if TYPE_CHECKING:
    from inference_server.continuous.core import ContinuousRequest, _Sample


class UNetDenoiser(Denoiser):
    """SD 1.x/2.x: a UNet2DConditionModel whose input is the plain latent (epsilon or v)."""

    family = "sd"

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        if getattr(pipe, "mask_processor", None) is None:
            # A text-to-image pipeline has no mask processor; make the inpainting pipeline's one.
            from diffusers.image_processor import VaeImageProcessor

            self.mask_processor = VaeImageProcessor(
                vae_scale_factor=pipe.vae_scale_factor,
                do_normalize=False,
                do_binarize=True,
                do_convert_grayscale=True,
            )
        else:
            self.mask_processor = pipe.mask_processor
        self._vae32: Any = None
        self._vae32_lock = threading.Lock()

    # -- prompts ------------------------------------------------------------------------------

    def cfg(self, request: ContinuousRequest) -> bool:
        return request.guidance > 1.0 and self.pipe.unet.config.time_cond_proj_dim is None

    def encode_text(self, text: str) -> tuple[torch.Tensor, ...]:
        pipe = self.pipe
        return (pipe.encode_prompt(text, pipe._execution_device, 1, False)[0],)

    def encode(self, request: ContinuousRequest, embed: TextEmbedder) -> Prompt:
        (cond,) = embed(request.prompt)
        if not self.cfg(request):
            return Prompt(rows=1, tensors={"hidden": cond})
        # The pipelines encode the negative prompt ("" when absent) exactly as a prompt: same padding
        # to the tokenizer's length, same encoder call, so one cache serves both.
        (uncond,) = embed(request.negative_prompt or "")
        return Prompt(rows=2, tensors={"hidden": torch.cat([uncond, cond])})

    # -- start --------------------------------------------------------------------------------

    def encode_image(self, image: torch.Tensor, generator: torch.Generator, task: str) -> torch.Tensor:
        """VAE-encode a preprocessed image into scaled latents, drawing from the sample's generator."""
        vae = self.pipe.vae
        return vae.encode(image).latent_dist.sample(generator) * vae.config.scaling_factor

    def prepare(
        self, request: ContinuousRequest, prompt: Prompt, scheduler: Any, generator: torch.Generator
    ) -> Start:
        """Follow the diffusers pipeline's set-up for a batch of one, in the same random order."""
        pipe, req = self.pipe, request
        device = pipe._execution_device
        dtype = prompt.tensors["hidden"].dtype
        scheduler.set_timesteps(req.steps, device=device)
        timesteps = scheduler.timesteps
        num_steps = req.steps
        if req.task != "txt2img":
            # StableDiffusionImg2ImgPipeline.get_timesteps
            init_timestep = min(int(req.steps * req.strength), req.steps)
            t_start = max(req.steps - init_timestep, 0)
            timesteps = scheduler.timesteps[t_start * scheduler.order :]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(t_start * scheduler.order)
            num_steps = req.steps - t_start
        elif self.family == "sdxl" and hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)  # StableDiffusionXLPipeline does
        f = pipe.vae_scale_factor
        blend = None
        if req.task == "txt2img":
            shape = (1, pipe.unet.config.in_channels, req.height // f, req.width // f)
            latents = randn(shape, generator, device, dtype) * scheduler.init_noise_sigma
        elif req.task == "img2img":
            # StableDiffusion(XL)Img2ImgPipeline.prepare_latents: VAE sample, then noise, same generator.
            image = pipe.image_processor.preprocess(req.image, height=req.height, width=req.width)
            image = image.to(device=device, dtype=dtype)
            init = self.encode_image(image, generator, "img2img")
            noise = randn(init.shape, generator, device, dtype)
            latents = scheduler.add_noise(init, noise, timesteps[:1].repeat(1))
        else:
            # StableDiffusion(XL)InpaintPipeline (4-channel UNet): image latents, noise, masked-image latents.
            init_image = pipe.image_processor.preprocess(
                req.image, height=req.height, width=req.width, crops_coords=None, resize_mode="default"
            ).to(dtype=torch.float32)
            image_latents = self.encode_image(init_image.to(device=device, dtype=dtype), generator, "inpaint")
            shape = (1, pipe.vae.config.latent_channels, req.height // f, req.width // f)
            noise = randn(shape, generator, device, dtype)
            if req.strength == 1.0:
                latents = noise * scheduler.init_noise_sigma
            else:
                latents = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(1))
            mask_condition = self.mask_processor.preprocess(
                req.mask, height=req.height, width=req.width, resize_mode="default", crops_coords=None
            )
            # The pipeline also VAE-encodes the masked image with the same generator; a 4-channel
            # UNet never uses the result, but the draw advances the generator that stochastic
            # samplers use later, so take the same draw without paying for the encoder.
            randn(image_latents.shape, generator, device, image_latents.dtype)
            mask = torch.nn.functional.interpolate(mask_condition, size=(req.height // f, req.width // f))
            blend = Blend(image_latents=image_latents, noise=noise, mask=mask.to(device=device, dtype=dtype))
        extra: dict[str, Any] = {}
        if pipe.unet.config.time_cond_proj_dim is not None:
            g = torch.tensor(req.guidance - 1).repeat(1)
            extra["timestep_cond"] = pipe.get_guidance_scale_embedding(
                g, embedding_dim=pipe.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=dtype)
        extra.update(self.added_conditions(req, prompt, dtype, device))
        return Start(latents=latents, timesteps=timesteps, num_steps=num_steps, blend=blend, extra=extra)

    def added_conditions(
        self, request: ContinuousRequest, prompt: Prompt, dtype: torch.dtype, device: Any
    ) -> dict[str, Any]:
        return {}

    # -- steps --------------------------------------------------------------------------------

    def predict(self, samples: list[_Sample]) -> torch.Tensor:
        args, kwargs = self.unet_inputs(samples)
        return self.pipe.unet(*args, **kwargs)[0]

    def unet_inputs(self, samples: list[_Sample]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The UNet's arguments for one batched call over `samples` at their timesteps."""
        inputs, conds = [], []
        for s in samples:
            x = torch.cat([s.latents] * 2) if s.prompt.rows == 2 else s.latents
            inputs.append(s.scheduler.scale_model_input(x, s.timesteps[s.i]))
            if "timestep_cond" in s.extra:
                conds.append(s.extra["timestep_cond"].repeat(s.prompt.rows, 1))
        # Every timestep reaches the UNet's sinusoidal embedding as float32 (it calls .float()), so
        # one float32 tensor serves integer and fractional (Karras/Euler) timesteps alike.
        args = (torch.cat(inputs), row_times(samples).to(inputs[0].device))
        kwargs = dict(
            encoder_hidden_states=stack_rows(samples, "hidden"),
            timestep_cond=torch.cat(conds) if conds else None,
            added_cond_kwargs=self.added_cond_kwargs(samples),
            return_dict=False,
        )
        return args, kwargs

    def predict_cached(self, samples: list[_Sample]) -> torch.Tensor:
        """`predict` with DeepCache per sample (continuous/caching.py): the samples due a full step
        (or uncached) run the whole UNet, keeping the deep features of those that cache; the others
        run the shallow path from their own cached features."""
        full: list[_Sample] = []
        reuse: list[_Sample] = []
        for s in samples:
            c = s.cache
            due = c is None or c.deep is None or unet_full_step(c.level, s.i, c.steps)
            (full if due else reuse).append(s)
        unet = self.pipe.unet
        preds: dict[int, torch.Tensor] = {}
        kept: dict[int, torch.Tensor] = {}
        if full:
            args, kwargs = self.unet_inputs(full)
            # The deep features each caching sample keeps: its level's cache depth says which up
            # block's input (step_cache.cached_block); one hook per depth in use.
            deep: dict[int, list[torch.Tensor]] = {
                LEVELS[s.cache.level].unet_depth: [] for s in full if s.cache is not None
            }
            handles = []
            for depth, store in deep.items():

                def keep_input(
                    module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], store: list = store
                ) -> None:
                    store.append(args[0] if args else kwargs["hidden_states"])

                handles.append(
                    cached_block(unet, depth).register_forward_pre_hook(keep_input, with_kwargs=True)
                )
            try:
                out = unet(*args, **kwargs)[0]
            finally:
                for handle in handles:
                    handle.remove()
            row = 0
            for s in full:
                rows = slice(row, row + s.prompt.rows)
                preds[id(s)] = out[rows]
                if s.cache is not None:
                    # A copy: a view would keep the whole call's features alive.
                    kept[id(s)] = deep[LEVELS[s.cache.level].unet_depth][0][rows].clone()
                row = rows.stop
        # The shallow path, one sub-batch per cache depth (levels of one depth share it).
        by_depth: dict[int, list[_Sample]] = {}
        for s in reuse:
            assert s.cache is not None and s.cache.deep is not None
            by_depth.setdefault(LEVELS[s.cache.level].unet_depth, []).append(s)
        for depth, group in by_depth.items():
            args, kwargs = self.unet_inputs(group)
            cached = torch.cat(
                [s.cache.deep for s in group if s.cache is not None and s.cache.deep is not None]
            )
            out = shallow_forward(unet, cached, *args, depth=depth, **kwargs)[0]
            row = 0
            for s in group:
                preds[id(s)] = out[row : row + s.prompt.rows]
                row += s.prompt.rows
        # The call succeeded: now the samples' states move on.
        for s in samples:
            if s.cache is None:
                continue
            if id(s) in kept:
                s.cache.deep = kept[id(s)]
                s.cache.full_steps += 1
            else:
                s.cache.reused_steps += 1
        return torch.cat([preds[id(s)] for s in samples])

    def added_cond_kwargs(self, samples: list[_Sample]) -> dict[str, torch.Tensor] | None:
        return None

    # -- images -------------------------------------------------------------------------------

    def vae(self) -> Any:
        """The VAE to code images with: a float32 copy when the model's is float16 and its config
        says float16 overflows (`force_upcast`, SDXL's VAE). The pipelines upcast the shared VAE in
        place for each call; here the encoder (worker thread) and the decoder (decode thread) would
        race over that, so they share one upcast copy instead (made once, ~2x the VAE's memory)."""
        vae = self.pipe.vae
        if not (vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)):
            return vae
        with self._vae32_lock:
            if self._vae32 is None:
                self._vae32 = copy.deepcopy(vae).to(torch.float32)
            return self._vae32

    def vae_input(self, sample: _Sample) -> torch.Tensor:
        return sample.latents / self.pipe.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae()
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0]


class SDXLDenoiser(UNetDenoiser):
    """SDXL: a UNet with `addition_embed_type="text_time"` (pooled text embeds and time ids)."""

    family = "sdxl"

    def encode_text(self, text: str) -> tuple[torch.Tensor, ...]:
        pipe = self.pipe
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=text,
            device=pipe._execution_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        return embeds, pooled

    def encode(self, request: ContinuousRequest, embed: TextEmbedder) -> Prompt:
        cond, pooled = embed(request.prompt)
        if not self.cfg(request):
            return Prompt(rows=1, tensors={"hidden": cond, "pooled": pooled})
        if request.negative_prompt is None and self.pipe.config.force_zeros_for_empty_prompt:
            # StableDiffusionXLPipeline.encode_prompt: no negative prompt at all means zeros (the
            # SDXL base checkpoints ask for it), an empty string is encoded like any text.
            uncond, uncond_pooled = torch.zeros_like(cond), torch.zeros_like(pooled)
        else:
            uncond, uncond_pooled = embed(request.negative_prompt or "")
        return Prompt(
            rows=2,
            tensors={"hidden": torch.cat([uncond, cond]), "pooled": torch.cat([uncond_pooled, pooled])},
        )

    def added_conditions(
        self, request: ContinuousRequest, prompt: Prompt, dtype: torch.dtype, device: Any
    ) -> dict[str, Any]:
        # `_get_add_time_ids`: original size + crop corner (0, 0) + target size, all the request's
        # size; refiner-style models (`requires_aesthetics_score`) take an aesthetic score instead of
        # the target size in their img2img and inpaint pipelines (6.0, negative 2.5).
        size = (request.height, request.width)
        if request.task != "txt2img" and getattr(self.pipe.config, "requires_aesthetics_score", False):
            ids, negative = [*size, 0, 0, 6.0], [*size, 0, 0, 2.5]
        else:
            ids = negative = [*size, 0, 0, *size]
        rows = [negative, ids] if prompt.rows == 2 else [ids]
        return {"time_ids": torch.tensor(rows, dtype=dtype, device=device)}

    def added_cond_kwargs(self, samples: list[_Sample]) -> dict[str, torch.Tensor] | None:
        return {
            "text_embeds": stack_rows(samples, "pooled"),
            "time_ids": torch.cat([s.extra["time_ids"] for s in samples]),
        }

    def encode_image(self, image: torch.Tensor, generator: torch.Generator, task: str) -> torch.Tensor:
        vae = self.vae()
        latents = vae.encode(image.to(vae.dtype)).latent_dist.sample(generator).to(image.dtype)
        config = vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if task == "img2img" and mean is not None and std is not None:
            # Only the img2img pipeline normalises by the VAE's latent statistics when encoding.
            mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std_t = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            return (latents - mean_t) * config.scaling_factor / std_t
        return latents * config.scaling_factor

    def vae_input(self, sample: _Sample) -> torch.Tensor:
        latents, config = sample.latents, self.pipe.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std_t = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            return latents * std_t / config.scaling_factor + mean_t
        return latents / config.scaling_factor
