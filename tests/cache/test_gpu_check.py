"""`make gpu-check` on a machine without a usable NVIDIA GPU: a clear message and its own status."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_without_a_gpu_it_says_so_and_exits_2() -> None:
    # No visible CUDA device, even on a machine that has one: the no-GPU path is what is tested.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "gpu_check.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "no NVIDIA GPU here" in done.stdout
    assert "Traceback" not in done.stderr
