"""How many jobs a dispatcher sends to the backend at once.

Each inference server runs one batch at a time; a bot that keeps about two batches' worth of jobs
per server there gives it the next batch while the current one runs (no idle gap), without piling
a queue the router can no longer move. So the limit follows the servers' reported capacity (the
sum of their batch sizes, `InferenceBackend.capacity()`), read again on every dispatcher tick as
servers join, leave or restart with another batch size. Every bot process sends to the same
servers, so that amount is shared: each dispatcher takes an equal share, rounded up, among itself
and the other live ones (a fresh heartbeat, bot/core/heartbeats.py) that are running jobs, counted
at each beat. So M busy bot processes keep about two batches per server in flight in all, not 2M;
an idle process (whose platforms have no traffic: the Discord jobs go to one process only) takes
no share from the busy ones. A burst that finds every process idle may overshoot until the next
beat (5 s). `[bot] dispatch_concurrency`, when set, overrides it (per process);
`[bot] max_dispatch_concurrency` caps it.
"""

from __future__ import annotations

import math

from bot.config import BotConfig

# Batches per server kept in flight: the one running and the next one queued behind it.
BATCHES_IN_FLIGHT = 2
# Without a reported capacity (Hugging Face, the fake, servers not up yet): the old fixed default,
# enough for one small server's batch.
UNKNOWN_CAPACITY_CONCURRENCY = 4


def dispatch_concurrency(config: BotConfig, capacity: int | None, dispatchers: int = 1) -> int:
    """Jobs this dispatcher may have at the backend at once, `dispatchers` (itself included)
    sharing the servers' `capacity`."""
    if config.dispatch_concurrency is not None:
        return config.dispatch_concurrency
    if capacity is None:
        # Nothing to share out yet: each process keeps the small fixed number.
        wanted = UNKNOWN_CAPACITY_CONCURRENCY
    else:
        # Rounded up: the sum over processes may pass 2x capacity by at most one job per process,
        # and no process is left without a slot.
        wanted = math.ceil(BATCHES_IN_FLIGHT * capacity / max(1, dispatchers))
    return max(1, min(config.max_dispatch_concurrency, wanted))
