"""Writing a tiny SD 1.x pipeline as one checkpoint in the original (LDM) layout, the file a
user downloads from a model site: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE),
`cond_stage_model.transformer.*` (CLIP). The renames are the inverse of the ones diffusers'
`from_single_file` applies (loaders/single_file_utils.py), written for any `layers_per_block` and
block count; `round_trip_problems` runs diffusers' own converters over the result to prove it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def unet_to_ldm(state: dict[str, Any], config: Any) -> dict[str, Any]:
    per_block = config["layers_per_block"]
    up_attention = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    out: dict[str, Any] = {}
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        new = None
        if module in _UNET_FIXED:
            new = f"{_UNET_FIXED[module]}.{param}"
        elif m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)$", module):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = 1 + b * (per_block + 1) + j
            new = f"input_blocks.{index}.{0 if kind == 'resnets' else 1}.{_resnet(rest) if kind == 'resnets' else rest}.{param}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv$", module):
            b = int(m[1])
            new = f"input_blocks.{1 + b * (per_block + 1) + per_block}.0.op.{param}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)$", module):
            new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}.{param}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)$", module):
            new = f"middle_block.1.{m[1]}.{param}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)$", module):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = b * (per_block + 1) + j
            new = f"output_blocks.{index}.{0 if kind == 'resnets' else 1}.{_resnet(rest) if kind == 'resnets' else rest}.{param}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv$", module):
            b = int(m[1])
            index = b * (per_block + 1) + per_block
            new = f"output_blocks.{index}.{2 if up_attention[b] else 1}.conv.{param}"
        if new is None:
            raise ValueError(f"no LDM name for UNet key {key}")
        out["model.diffusion_model." + new] = tensor
    return out


def _resnet(rest: str) -> str:
    return _RESNET.get(rest, rest)


def vae_to_ldm(state: dict[str, Any], config: Any) -> dict[str, Any]:
    blocks = len(config["up_block_types"])
    out: dict[str, Any] = {}
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        new = module.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", new)
        new = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", new)
        new = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{blocks - 1 - int(m[1])}.block.", new)
        new = re.sub(
            r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{blocks - 1 - int(m[1])}.upsample.", new
        )
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        if ".mid_block.attentions.0." in f".{new}.":
            head, _, inner = new.partition("mid_block.attentions.0.")
            new = head + "mid.attn_1." + attention[inner]
            if tensor.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                tensor = tensor[:, :, None, None]
        out[f"first_stage_model.{new}.{param}"] = tensor
    return out


def write_ldm_checkpoint(pipe: Any, path: Path) -> Path:
    """`pipe` (a StableDiffusionPipeline) as one .safetensors file in the original layout."""
    from safetensors.torch import save_file

    state = {
        **unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config),
        **vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config),
        # The original layout nests CLIP under text_model (transformers >= 5.6 dropped that level).
        **{
            f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}": v
            for k, v in pipe.text_encoder.state_dict().items()
        },
    }
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def round_trip_problems(pipe: Any, checkpoint: dict[str, Any]) -> list[str]:
    """Keys diffusers' converters don't bring back to `pipe`'s own, with equal values (empty: good)."""
    import torch
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    problems = []
    for name, converted in (
        ("unet", convert_ldm_unet_checkpoint(checkpoint, pipe.unet.config)),
        ("vae", convert_ldm_vae_checkpoint(checkpoint, pipe.vae.config)),
    ):
        own = getattr(pipe, name).state_dict()
        problems += [f"{name}: {k} missing" for k in own if k not in converted]
        problems += [f"{name}: {k} extra" for k in converted if k not in own]
        problems += [
            f"{name}: {k} differs" for k in own if k in converted and not torch.equal(own[k], converted[k])
        ]
    return problems
