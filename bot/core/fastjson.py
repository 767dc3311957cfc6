"""JSON for the database: orjson, with the standard library's json for what orjson refuses.

Every JSON column a submission writes (a job's parameters, seeds, LoRAs, delivery) and every batch
of rows sent to PostgreSQL as one document (`bot.core.bulk.rows_param`) went through `json.dumps`,
whose Python-level encoder cost more of a submit batch than any of its statements' own work
(about 11 microseconds per job row, 1.9 with orjson; 1.5 ms against 0.55 ms for a PostgreSQL
batch of 200). The text differs only in its spacing (orjson writes none), which JSON readers
ignore. What orjson refuses and `json` takes (an integer beyond 64 bits in an adapter's delivery
mapping) falls back to `json`, so no value that was stored before is refused now; NaN and
infinities, which `json` writes as invalid JSON, orjson writes as null. Reading stays with `json`:
orjson reads an integer beyond 64 bits as a float.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson

_OPTIONS = orjson.OPT_NON_STR_KEYS  # json.dumps turns int keys into strings: so does this


def dumps(value: Any) -> str:
    try:
        return orjson.dumps(value, option=_OPTIONS).decode()
    except orjson.JSONEncodeError:
        return json.dumps(value, separators=(",", ":"))


def dumps_with(value: Any, default: Callable[[Any], Any]) -> str:
    """`value` with `default` converting what JSON has no type for; datetimes and dates go to
    `default` too (orjson's own format for them is not the one asked for)."""
    try:
        return orjson.dumps(
            value, default=default, option=_OPTIONS | orjson.OPT_PASSTHROUGH_DATETIME
        ).decode()
    except orjson.JSONEncodeError:
        return json.dumps(value, default=default, separators=(",", ":"))
