"""A tiny random StableDiffusionPipeline built from configs, for tests and benchmarks.

Same idea as diffusers' own `get_dummy_components`: real modules, random weights, no download.
`save_tiny_pipeline(folder)` writes it with `save_pretrained`, so the server loads it through the
same `from_pretrained` path as a real checkpoint. Weights are fixed by `seed`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TinyPipelineSpec:
    """Sizes of the tiny pipeline (its config is printed by the benchmark)."""

    unet_channels: tuple[int, ...] = (8, 16)
    vae_channels: tuple[int, ...] = (8, 16)
    text_hidden: int = 32
    text_layers: int = 2
    max_tokens: int = 16
    sample_size: int = 32  # native image size in pixels (the VAE halves it once per extra block)
    seed: int = 0

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items())


def build_tiny_pipeline(spec: TinyPipelineSpec | None = None) -> Any:
    """A StableDiffusionPipeline with random tiny components (CPU, float32)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from inference_server.embedded.tokenizer import clip_vocab

    spec = spec or TinyPipelineSpec()
    torch.manual_seed(spec.seed)
    n_blocks = len(spec.unet_channels)
    vae_down = 2 ** (len(spec.vae_channels) - 1)
    unet = UNet2DConditionModel(
        block_out_channels=spec.unet_channels,
        layers_per_block=1,
        sample_size=spec.sample_size // vae_down,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n_blocks - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n_blocks - 1) + ("UpBlock2D",),
        cross_attention_dim=spec.text_hidden,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=spec.vae_channels,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=spec.sample_size,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=spec.text_hidden,
            intermediate_size=spec.text_hidden * 2,
            num_attention_heads=4,
            num_hidden_layers=spec.text_layers,
            max_position_embeddings=spec.max_tokens,
            vocab_size=514,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
        )
    )
    # CLIP's byte-level vocabulary without merges (512 symbols and the two special tokens).
    tokenizer = CLIPTokenizer(vocab=clip_vocab([]), merges=[], model_max_length=spec.max_tokens)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
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


def save_tiny_pipeline(folder: str | Path, spec: TinyPipelineSpec | None = None) -> Path:
    """Build the tiny pipeline and `save_pretrained` it into `folder` (returned)."""
    folder = Path(folder)
    build_tiny_pipeline(spec).save_pretrained(folder)
    return folder
