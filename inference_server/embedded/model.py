"""Configs of the embedded model's parts: stock diffusers/transformers classes, small sizes."""

from __future__ import annotations

from typing import Any

from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .tokenizer import MAX_LENGTH

LATENT_CHANNELS = 4
TEXT_DIM = 128


def make_vae() -> AutoencoderKL:
    # Two downsamples: 64x64 RGB -> 16x16x4 latents (SD uses three, 512 -> 64).
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        # Measured on the 2-core CPU (batch 32 train step): (32, 64, 64) with the mid-block attention
        # 3.3 s, (16, 32, 64) without it 1.0 s; flat-coloured shapes need neither the width nor
        # the global attention. Decoding one image takes ~12 ms.
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=64,
        mid_block_add_attention=False,
    )


def make_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_DIM,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=TEXT_DIM,
        )
    )


def make_unet() -> UNet2DConditionModel:
    # One guided step (batch 2) on one CPU thread is what the 0.3 s/image latency goal pays for 20
    # times; at this size it is dominated by the number of ops, not by their width. Measured
    # (random weights, 1 thread): channels (32, 64, 128) with cross-attention at 4x4, in the mid
    # block and in the first up block 20 ms (the first shipped model, 4.0 M parameters); the same
    # with attention in the mid block only 14 ms; (24, 48, 96) with attention in the mid block only
    # 11.6 ms and a training step half as long. Prompts here carry no positions: the global colour
    # and shape signal comes from the pooled text embedding added to the time embedding ("text"
    # addition embedding, computed from encoder_hidden_states, which the stock pipeline passes) and
    # the mid block's cross-attention.
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(24, 48, 96),
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        layers_per_block=1,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=4,  # diffusers quirk: this is the number of heads
        norm_num_groups=8,
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )


def train_scheduler_config(schedule: str = "scaled_linear") -> dict[str, Any]:
    if schedule == "scaled_linear":  # Stable Diffusion 1.x
        betas = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    elif schedule == "linear":  # the original DDPM paper; far less signal left at t=999
        betas = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return {"num_train_timesteps": 1000, "prediction_type": "epsilon", "clip_sample": False, **betas}


def make_train_scheduler(schedule: str = "scaled_linear") -> DDPMScheduler:
    return DDPMScheduler.from_config(train_scheduler_config(schedule))


def make_sample_scheduler(
    schedule: str = "scaled_linear", spacing: str = "trailing"
) -> DPMSolverMultistepScheduler:
    # "trailing" starts sampling at t=999, the noise level the model was trained to start from.
    return DPMSolverMultistepScheduler.from_config(
        {
            **train_scheduler_config(schedule),
            "algorithm_type": "dpmsolver++",
            "solver_order": 2,
            "timestep_spacing": spacing,
            # StableDiffusionPipeline rewrites any other value to 1 (with a warning); trailing
            # spacing does not use it.
            "steps_offset": 1,
        }
    )


def assemble(
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
    scheduler,
) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
