"""Fixtures for the embedded model's tests: the shipped weights folder, loaded once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

WEIGHTS = Path(__file__).resolve().parents[2] / "inference_server" / "embedded" / "weights"


@pytest.fixture(scope="session")
def shipped_pipeline():
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(2)
    pipe = StableDiffusionPipeline.from_pretrained(WEIGHTS, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
