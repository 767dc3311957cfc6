"""Continuous (iteration-level) batching: `[batching] engine = "continuous"`.

`core.ContinuousEngine` is the scheduler (torch, one worker thread); `engine.ContinuousBatchingEngine`
puts it behind the server's `Engine` interface. Importing this package does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from inference_server.continuous.engine import ContinuousBatchingEngine

if TYPE_CHECKING:
    from inference_server.config import Config
    from inference_server.metrics import Metrics
    from inference_server.pipelines import PipelineRunner

__all__ = ["ContinuousBatchingEngine", "build_engine"]


def build_engine(config: Config, runner: PipelineRunner, metrics: Metrics) -> ContinuousBatchingEngine:
    """Called by `app.build_engine` when `[batching] engine = "continuous"`."""
    return ContinuousBatchingEngine(runner, config.batching, metrics)
