"""Making a LoRA for a tiny pipeline the way a trainer does: PEFT adapters on the UNet's attention
projections (`unet.add_adapter(LoraConfig(...))`), their state dict from PEFT, written with the
pipeline class's `save_lora_weights`: the file diffusers' training scripts write."""

from __future__ import annotations

from pathlib import Path


def make_lora(pipeline_folder: Path, out: Path, *, seed: int, rank: int = 4) -> Path:
    """A LoRA for the UNet of the pipeline in `pipeline_folder`, with random (non-zero) weights so it
    visibly changes images; returns `out` (a folder holding pytorch_lora_weights.safetensors)."""
    import torch
    from diffusers import DiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(str(pipeline_folder))
    unet = pipe.unet
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    # PEFT starts lora_B at zero (the adapter changes nothing until trained): stand in for training.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    type(pipe).save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(unet))
    return out
