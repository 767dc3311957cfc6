"""Readiness of a bot process: its database answers, and at least one inference server does.

`/healthz` (liveness) only says the process serves HTTP; `/readyz` says whether it can do its work
now, with the reason when not, so that an orchestrator routes traffic away (and an operator sees why)
instead of restarting a process whose database or GPU servers are down.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from sqlalchemy import text

from bot.backends.base import InferenceBackend, ServerFleet
from bot.core.db import Database

log = logging.getLogger("bot.core.health")

# A readiness probe must answer within the orchestrator's probe timeout (Kubernetes: 1 s by default,
# ours set to 5 s): a database that takes longer than this to answer `select 1` is not ready.
DB_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reason: str


class ReadinessCheck:
    def __init__(self, db: Database, backend: InferenceBackend):
        self.db = db
        self.backend = backend

    async def check(self) -> Readiness:
        try:
            async with asyncio.timeout(DB_TIMEOUT_S):
                async with self.db.read() as s:
                    await s.execute(text("select 1"))
        except Exception as e:  # noqa: BLE001 - whatever the driver raises, the answer is "not ready"
            log.warning("readiness: the database does not answer: %s", e)
            return Readiness(False, f"database unreachable ({type(e).__name__})")
        if isinstance(self.backend, ServerFleet):
            if not await self.backend.reachable_servers():
                return Readiness(False, "no inference server reachable")
            return Readiness(True, "ready")
        # Hosted APIs (Hugging Face) and the in-process fake have no servers of ours to probe.
        return Readiness(True, "ready")
