"""A few-step run of the real training script produces a loadable pipeline folder."""

import json

import torch
from diffusers import StableDiffusionPipeline

from inference_server.embedded import train


def test_smoke_run_exports_a_loadable_pipeline_and_resumes(tmp_path):
    out = tmp_path / "work"
    assert train.main(["--smoke", "--out", str(out)]) == 0
    folder = out / "pipeline"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unet_steps"] == 3 and summary["vae_steps"] == 3
    assert (out / "unet_ckpt.pt").exists() and (out / "vae" / "config.json").exists()
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red circle on a blue background",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)
    assert (folder / "tokenizer" / "vocab.json").exists()
    # --resume continues from the checkpoints: two more UNet steps, the VAE is reused
    assert train.main(["--smoke", "--out", str(out), "--resume", "--unet-steps", "5"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unet_steps"] == 5 and "vae_steps" not in summary
