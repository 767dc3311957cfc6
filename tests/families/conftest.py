"""Fixtures: each tiny model family saved to disk once per session (`family_path(name)`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from inference_server.tiny_families import TinyFamily, save_tiny_family


@pytest.fixture(scope="session")
def family_path(tmp_path_factory: pytest.TempPathFactory) -> Callable[[TinyFamily], Path]:
    """`family_path("flux_dev")`: the folder of that tiny pipeline, saved on first use."""
    saved: dict[str, Path] = {}

    def get(name: TinyFamily) -> Path:
        if name not in saved:
            saved[name] = save_tiny_family(name, tmp_path_factory.mktemp(name) / "pipe")
        return saved[name]

    return get
