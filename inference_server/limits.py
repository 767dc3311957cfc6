"""The request limits that are not configurable, each with the reason for its number.

The configurable ones (prompt length, image side, steps, images per request, timeouts) are keys of
`[inference_server]` (`config.ServerConfig`). Both kinds reach the request schemas (`schemas.py`),
and so the error messages and the OpenAPI document, from here and from there only.
"""

from __future__ import annotations

# Seeds are uint32 so that every client (JavaScript numbers included) can echo them back exactly.
SEED_LIMIT = 2**32
# Beyond this, classifier-free guidance only burns the image.
MAX_GUIDANCE = 30.0
# Priorities are small ranks (the bot's fairness order); the bound only keeps them sane integers.
PRIORITY_LIMIT = 1_000_000
