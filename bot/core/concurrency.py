"""How many jobs a dispatcher sends to the backend at once.

Each inference server runs one batch at a time; a bot that keeps about two batches' worth of jobs
per server there gives it the next batch while the current one runs (no idle gap), without piling
a queue the router can no longer move. So the limit follows the servers' reported capacity (the
sum of their batch sizes, `InferenceBackend.capacity()`), read again on every dispatcher tick as
servers join, leave or restart with another batch size. `[bot] dispatch_concurrency`, when set,
overrides it; `[bot] max_dispatch_concurrency` caps it.
"""

from __future__ import annotations

from bot.config import BotConfig

# Batches per server kept in flight: the one running and the next one queued behind it.
BATCHES_IN_FLIGHT = 2
# Without a reported capacity (Hugging Face, the fake, servers not up yet): the old fixed default,
# enough for one small server's batch.
UNKNOWN_CAPACITY_CONCURRENCY = 4


def dispatch_concurrency(config: BotConfig, capacity: int | None) -> int:
    if config.dispatch_concurrency is not None:
        return config.dispatch_concurrency
    wanted = UNKNOWN_CAPACITY_CONCURRENCY if capacity is None else BATCHES_IN_FLIGHT * capacity
    return max(1, min(config.max_dispatch_concurrency, wanted))
