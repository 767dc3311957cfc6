"""Tiny random-weight pipelines of every model family the server serves, for tests and benchmarks.

Built like diffusers' own tests build theirs (`get_dummy_components` in
`tests/pipelines/<family>/test_*.py`): the real pipeline and model classes, tiny configs, random
weights fixed by a seed, nothing downloaded. Unlike diffusers' dummies they keep the geometry of the
real checkpoints where the server's behaviour depends on it: an 8x VAE (so SD3/FLUX sizes are
multiples of 16 and SD/SDXL sizes multiples of 8, as for real models), SD3's 2x2 patches, FLUX's
packed latents with 16 transformer input channels, SDXL's added time ids, SD 2.x's v-prediction,
FLUX.1-dev's guidance embedding, and the schedulers the real checkpoints ship with.

`save_tiny_family(name, folder)` writes one with `save_pretrained`, so the server loads it through
the same `from_pretrained` path as a real checkpoint. The tokenizers are built in code: CLIP's
byte-level vocabulary without merges (as `testing.py` does for the SD pipeline) and a Unigram T5
tokenizer from a vocabulary list (no sentencepiece file).

| name | pipeline | native size | what it stands for |
| --- | --- | --- | --- |
| sd15 | StableDiffusionPipeline | 64 | SD 1.x (epsilon prediction, PNDM-family default) |
| sd2v | StableDiffusionPipeline | 96 | SD 2.x-768 (v-prediction, linear projections) |
| sdxl | StableDiffusionXLPipeline | 128 | SDXL (two CLIP encoders, pooled embeds, time ids) |
| sd3 | StableDiffusion3Pipeline | 128 | SD 3.x with its T5 encoder |
| sd3_no_t5 | StableDiffusion3Pipeline | 128 | SD 3.x saved without T5 (text_encoder_3 = None) |
| flux_dev | FluxPipeline | 1024 | FLUX.1-dev (guidance embedding, dynamic shift) |
| flux_schnell | FluxPipeline | 1024 | FLUX.1-schnell (no guidance embedding, fixed shift) |

FLUX's native size is a constant of `FluxPipeline` (1024), not a config value, so a server of a tiny
FLUX sets `[model] width`/`height` (tests use 64) to keep generations fast.

torch, diffusers and transformers are imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args

TinyFamily = Literal["sd15", "sd2v", "sdxl", "sd3", "sd3_no_t5", "flux_dev", "flux_schnell"]
TINY_FAMILIES: tuple[TinyFamily, ...] = get_args(TinyFamily)

# CLIP's sequence length in the tiny encoders (real CLIP: 77). Short keeps every call fast.
CLIP_TOKENS = 16
# T5's width; SD3 concatenates the two CLIP encoders' hidden states (32 + 32) and pads them to it.
T5_WIDTH = 64
# SD3's T5 sequence length (real default 256); FLUX passes its own (`FLUX_T5_TOKENS`).
_T5_LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"


def _vae(native: int, *, latent_channels: int = 4, flow: bool = False) -> Any:
    """An AutoencoderKL with four blocks (8x down-sampling, as every real checkpoint has)."""
    from diffusers import AutoencoderKL

    extra: dict[str, Any] = {}
    if flow:
        # SD3 and FLUX VAEs: no quant convs, a shift and a scale on the latents.
        extra = {
            "use_quant_conv": False,
            "use_post_quant_conv": False,
            "shift_factor": 0.0609,
            "scaling_factor": 1.5035,
        }
    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=native,
        **extra,
    )


def _clip_config(**extra: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,  # SDXL and SD3 read the penultimate layer's hidden states
        max_position_embeddings=CLIP_TOKENS,
        vocab_size=514,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        **extra,
    )


def _clip_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    from inference_server.embedded.tokenizer import clip_vocab

    # CLIP's byte-level vocabulary without merges: 512 symbols and the two special tokens.
    return CLIPTokenizer(vocab=clip_vocab([]), merges=[], model_max_length=CLIP_TOKENS)


def t5_vocab() -> list[tuple[str, float]]:
    """A Unigram vocabulary for the tiny T5 tokenizer: specials, letters and digits, word starts."""
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces = (
        [("\u2581", -2.0)] + [(c, -3.0) for c in _T5_LETTERS] + [("\u2581" + c, -2.5) for c in _T5_LETTERS]
    )
    return specials + pieces


def _t5() -> tuple[Any, Any]:
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    vocab = t5_vocab()
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(vocab),
            d_model=T5_WIDTH,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    return encoder, tokenizer


def _unet(native: int, **extra: Any) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=native // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        **{"cross_attention_dim": 32, "attention_head_dim": 2, **extra},
    )


def _sd(v_prediction: bool) -> Any:
    import torch
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    native = 96 if v_prediction else 64
    torch.manual_seed(0)
    if v_prediction:
        # SD 2.x: linear projections in the transformer blocks, per-block head sizes, GELU CLIP.
        unet = _unet(native, use_linear_projection=True, attention_head_dim=(2, 4))
        text_encoder = CLIPTextModel(_clip_config(hidden_act="gelu"))
        scheduler: Any = DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type="v_prediction",
        )
    else:
        unet = _unet(native)
        text_encoder = CLIPTextModel(_clip_config())
        scheduler = PNDMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            skip_prk_steps=True,
            steps_offset=1,
        )
    return StableDiffusionPipeline(
        vae=_vae(native),
        text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl() -> Any:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    native = 128
    torch.manual_seed(0)
    unet = _unet(
        native,
        use_linear_projection=True,
        attention_head_dim=(2, 4),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        # 6 time ids x 8 + the second encoder's pooled projection (32)
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,  # both encoders' hidden states side by side (32 + 32)
    )
    return StableDiffusionXLPipeline(
        vae=_vae(native),
        text_encoder=CLIPTextModel(_clip_config(hidden_act="gelu")),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(hidden_act="gelu", projection_dim=32)),
        tokenizer=_clip_tokenizer(),
        tokenizer_2=_clip_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        ),
    )


def _sd3(with_t5: bool) -> Any:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    native = 128
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=native // 8,
        patch_size=2,
        in_channels=16,  # SD3's VAE has 16 latent channels (its inpaint pipeline insists)
        out_channels=16,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=64,  # both CLIP encoders' projections (32 + 32)
    )
    config = _clip_config(hidden_act="gelu", projection_dim=32)
    text_encoder = CLIPTextModelWithProjection(config)
    text_encoder_2 = CLIPTextModelWithProjection(config)
    t5, t5_tokenizer = _t5() if with_t5 else (None, None)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(native, latent_channels=16, flow=True),
        text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=_clip_tokenizer(),
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
    )


def _flux(dev: bool) -> Any:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2x2, as in FLUX.1
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=32,  # CLIP's pooled output
        axes_dims_rope=(4, 4, 8),
        guidance_embeds=dev,
    )
    if dev:
        # FLUX.1-dev's scheduler: the shift grows with the image's token count (`mu`).
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    else:
        # FLUX.1-schnell's: a fixed shift of 1.
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    t5, t5_tokenizer = _t5()
    return FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=_vae(1024, latent_channels=16, flow=True),
        text_encoder=CLIPTextModel(_clip_config(hidden_act="gelu")),
        tokenizer=_clip_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
    )


_BUILDERS: dict[TinyFamily, Callable[[], Any]] = {
    "sd15": lambda: _sd(v_prediction=False),
    "sd2v": lambda: _sd(v_prediction=True),
    "sdxl": _sdxl,
    "sd3": lambda: _sd3(with_t5=True),
    "sd3_no_t5": lambda: _sd3(with_t5=False),
    "flux_dev": lambda: _flux(dev=True),
    "flux_schnell": lambda: _flux(dev=False),
}


def build_tiny_family(name: TinyFamily) -> Any:
    """The tiny pipeline of family `name` (one of `TINY_FAMILIES`), on the CPU in float32.

    Weights are random but fixed: every builder seeds torch with 0 before creating its modules.
    """
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown tiny family {name!r}; one of {', '.join(TINY_FAMILIES)}") from None
    import torch

    pipe = builder()
    pipe.set_progress_bar_config(disable=True)
    # Built modules start in training mode (T5's dropout then makes every call random);
    # `from_pretrained` puts them in eval mode, so do the same here.
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def save_tiny_family(name: TinyFamily, folder: str | Path) -> Path:
    """Build the tiny pipeline of family `name` and `save_pretrained` it into `folder` (returned)."""
    folder = Path(folder)
    build_tiny_family(name).save_pretrained(folder)
    return folder
