"""Continuous (iteration-level) batching: `[batching] engine = "continuous"`.

`core.ContinuousEngine` is the scheduler (torch, one worker thread); `engine.ContinuousBatchingEngine`
puts it behind the server's `Engine` interface. Importing this package does not import torch.
"""

from inference_server.continuous.engine import ContinuousBatchingEngine

__all__ = ["ContinuousBatchingEngine"]


def build_engine(config, runner, metrics):  # noqa: ANN001, ANN201 (types live in app.py's imports)
    """Called by `app.build_engine` when `[batching] engine = "continuous"`."""
    return ContinuousBatchingEngine(runner, config.batching, metrics)
