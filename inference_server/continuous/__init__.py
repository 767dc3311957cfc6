"""Continuous (iteration-level) batching: `[batching] engine = "continuous"`.

`core.ContinuousEngine` is the scheduler (torch, one worker thread); `engine.ContinuousBatchingEngine`
puts it behind the server's `Engine` interface. Importing this package does not import torch.
"""

from __future__ import annotations

from inference_server.continuous.engine import ContinuousBatchingEngine

__all__ = ["ContinuousBatchingEngine"]
