"""`ModelWatch`: keeps the core's view of the backend's model current.

The inference server reports what its model accepts (`capabilities` in `/health`: family, size
multiple, default size, steps and guidance, tasks). The bot asks at start-up, then every
`REFRESH_S` (every `UNKNOWN_REFRESH_S` until a first answer), and puts the answer on the service (`CoreService.model`), where parsing and sizing
read it (`bot.core.params.Limits`). An answer of None (a backend that doesn't report, or no server
reachable) keeps the last known capabilities: a server restarting must not turn the bot's flags
back to another model's.

The same refresh reads the models the servers offer (`backend.models()`, their `GET /v1/models`) into
`CoreService.catalog`: which models and LoRAs `--model` and `--lora` may name, each model's
capabilities, and (inside the backend) which server hosts what, for routing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from bot.backends.base import InferenceBackend
from bot.core.model_choice import ModelCatalog
from bot.core.service import CoreService

log = logging.getLogger("bot.core.model")

# A model changes only when an operator restarts a server with another one; a minute is soon enough
# for the bot to follow, and a /health call a minute costs nothing.
REFRESH_S = 60.0
# Until a first answer (the server may still be loading its model), ask this often.
UNKNOWN_REFRESH_S = 5.0
# Start-up waits this long at most for a first answer (a server loading its model answers at once,
# without capabilities; one that is down costs the connect timeout).
FIRST_REFRESH_S = 10.0


class ModelWatch:
    def __init__(
        self,
        service: CoreService,
        backend: InferenceBackend,
        *,
        interval_s: float = REFRESH_S,
        unknown_interval_s: float = UNKNOWN_REFRESH_S,
    ):
        self.service = service
        self.backend = backend
        self.interval_s = interval_s
        self.unknown_interval_s = unknown_interval_s
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        await self._refresh_models()
        try:
            found = await self.backend.capabilities()
        except Exception:  # a backend bug must not stop the bot; the last known view stays
            log.exception("asking the backend for its model's capabilities failed")
            return
        if found is None or found == self.service.model:
            return
        log.info(
            "model: %s (%s), %dx%d by default in multiples of %d, %d steps, guidance %g (%s); tasks %s",
            found.label,
            found.family,
            found.default_width,
            found.default_height,
            found.size_multiple,
            found.default_steps,
            found.default_guidance,
            found.guidance,
            ", ".join(found.tasks),
        )
        self.service.model = found

    async def _refresh_models(self) -> None:
        try:
            models = await self.backend.models()
        except Exception:  # as above: the last known list stays
            log.exception("asking the backend for its models failed")
            return
        if models is None:
            return  # no server answered with a list (or none offers a choice): keep what we knew
        catalog = ModelCatalog(models)
        if catalog == self.service.catalog:
            return
        log.info(
            "models: %s",
            "; ".join(
                f"{m.name} ({m.family}{', default' if m.default else ''}) on {len(m.servers) or 1} "
                f"server(s), LoRAs: {', '.join(m.loras) or 'none'}"
                for m in catalog.models
            )
            or "none offered",
        )
        self.service.catalog = catalog

    async def start(self) -> None:
        """A first refresh (bounded by FIRST_REFRESH_S), then one every `interval_s` in the background
        (every `unknown_interval_s` while nothing is known yet)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FIRST_REFRESH_S):
                await self.refresh()
        if self.service.model is None:
            log.info("the backend reports no model capabilities yet: [bot] settings apply until it does")
        self._task = asyncio.create_task(self._run(), name="model-watch")

    async def _run(self) -> None:
        while True:
            known = self.service.model is not None
            await asyncio.sleep(self.interval_s if known else self.unknown_interval_s)
            await self.refresh()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
