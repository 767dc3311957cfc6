"""`bot.core.fastjson`: what the database is sent as JSON reads back as the standard library wrote
it, on both databases, including the values orjson itself refuses."""

from __future__ import annotations

import datetime as dt
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.core import fastjson
from bot.core.api import Actor, Place
from tests.core.helpers import running_core

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**90), max_value=2**90)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(JSON_VALUES)
def test_dumps_reads_back_as_json_dumps_does(value: object) -> None:
    assert json.loads(fastjson.dumps(value)) == json.loads(json.dumps(value))


def test_what_orjson_refuses_falls_back_and_what_json_refuses_is_still_refused() -> None:
    assert json.loads(fastjson.dumps({"big": 2**80})) == {"big": 2**80}  # orjson: 64 bits at most
    assert json.loads(fastjson.dumps({1: "a"})) == {"1": "a"}  # int keys become text, as in json
    assert fastjson.dumps(math.nan) == "null"  # valid JSON, where json wrote NaN
    with pytest.raises(TypeError):
        fastjson.dumps({"x": object()})

    def iso(value: object) -> str:
        if isinstance(value, dt.date):
            return value.isoformat()
        raise TypeError(type(value).__name__)

    when = dt.datetime(2026, 12, 3, 13, 40, 0, 7, tzinfo=dt.UTC)
    rows = [{"at": when, "day": when.date(), "n": 2**70}]
    assert fastjson.dumps_with(rows, iso) == json.dumps(rows, default=iso, separators=(",", ":"))
    with pytest.raises(TypeError):
        fastjson.dumps_with([{"x": object()}], iso)


async def test_a_jobs_json_columns_round_trip_through_both_databases(db_url, tmp_path):
    async with running_core(db_url, tmp_path, start=False) as (core, _):
        delivery = {"token": "é\u2603", "ids": [1, 2**70], "nested": {"ok": True, "none": None}}
        view = await core.service.imagine(
            Actor("discord", "u1", "U"),
            Place("discord", "g", "c"),
            "a fox --seed 7",
            idempotency_key="k",
            delivery=delivery,
        )
        again = await core.service.get_job(view.id)
        assert again.delivery == delivery == view.delivery
        assert again.params.seeds == view.params.seeds == (7,)
