"""Fixtures: tiny SD 1.5 and SDXL pipelines on disk, LoRAs for them made here with PEFT, and a real
server holding both models side by side (the `[registry]` of docs/models.md)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from inference_server.config import BatchingConfig, Config, ModelConfig, RegistryConfig, ServerConfig
from inference_server.tiny_families import save_tiny_family
from tests.models.loras import make_lora
from tests.server.conftest import Server, running_server


@pytest.fixture(scope="session")
def sd15_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_family("sd15", tmp_path_factory.mktemp("sd15") / "pipe")


@pytest.fixture(scope="session")
def sdxl_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_family("sdxl", tmp_path_factory.mktemp("sdxl") / "pipe")


@pytest.fixture(scope="session")
def loras_dir(tmp_path_factory: pytest.TempPathFactory, sd15_path: Path, sdxl_path: Path) -> Path:
    """Two LoRAs for the SD 1.5 UNet (a folder as diffusers saves it, and a bare file) and one for SDXL."""
    folder = tmp_path_factory.mktemp("loras")
    make_lora(sd15_path, folder / "style", seed=1)
    make_lora(sd15_path, folder / "detail", seed=2)
    (folder / "detail" / "pytorch_lora_weights.safetensors").rename(folder / "detail.safetensors")
    (folder / "detail").rmdir()
    make_lora(sdxl_path, folder / "xlstyle", seed=3)
    (folder / "notes.txt").write_text("not a LoRA: ignored")
    return folder


def tiny_model(path: Path, **extra: Any) -> ModelConfig:
    # One thread (the 2 shared cores also run other jobs); 2 steps at 64x64: enough to compare images.
    options: dict[str, Any] = {"width": 64, "height": 64, "steps": 2, "guidance": 5.0, "cpu_threads": 1}
    return ModelConfig(path=str(path), **{"warmup": False, **options, **extra})


def registry_config(
    sd15_path: Path, sdxl_path: Path, loras_dir: Path | None = None, **changes: Any
) -> Config:
    """`[models.sd15]` (the default) and `[models.xl]`, no `[model]` section."""
    models = changes.pop("models", None) or {
        "sd15": tiny_model(sd15_path, default=True),
        "xl": tiny_model(sdxl_path),
    }
    return Config(
        server=ServerConfig(port=0, progress_interval_s=0.0, shutdown_grace_s=20.0),
        model=ModelConfig(),
        batching=changes.pop("batching", BatchingConfig(max_batch_size=8, max_wait_ms=50.0, max_queue=32)),
        registry=RegistryConfig(loras_dir=str(loras_dir) if loras_dir else "", **changes),
        models=models,
        model_section=False,
    )


@pytest.fixture
def models_server(sd15_path: Path, sdxl_path: Path, loras_dir: Path) -> Callable[..., Any]:
    """`async with models_server(**registry_changes) as server:` a real server of both models."""

    def factory(**changes: Any) -> Any:
        return running_server(registry_config(sd15_path, sdxl_path, loras_dir, **changes))

    return factory


@pytest.fixture
async def server(models_server: Callable[..., Any]) -> AsyncIterator[Server]:
    async with models_server() as s:
        yield s
