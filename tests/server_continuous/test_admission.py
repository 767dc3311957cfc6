"""Admission rules of the continuous engine.

`"efficient"`: a joiner joins only when the wait it saves pays for the slower steps. `"capped"`: the
running batch stops growing at the smallest size within 2% of the best measured images/s (less as
the queue deepens).

The cost of an iteration is injected (a made-up curve), so the decisions don't depend on this
machine's timings: STEEP is c(1) = 1, c(2) = 3 (a second image triples the step: joining rarely
pays).
"""

from __future__ import annotations

from typing import Any

from tests.server_continuous.test_scheduling import Recorder, request

STEEP = {1: 1.0, 2: 3.0, 3: 5.0}
# Proportional: n images cost n times one (a big model on a GPU, nearly): batching buys nothing.
PROPORTIONAL = {n: float(n) for n in range(1, 9)}
# A second image is nearly free, a third costs a whole image: 2 images/step is the efficient size.
KNEE_AT_2 = {1: 1.0, 2: 1.1, 3: 2.1, 4: 3.1}
# Batching nearly free up to 4: the cap is the max batch.
CHEAP = {1: 1.0, 2: 1.05, 3: 1.1, 4: 1.15}


def run_pair(
    engine: Any, long_steps: int, late_steps: int, count: int = 1
) -> tuple[Any, list[Any], Recorder]:
    """A `long_steps` request; at its first step, `count` requests of `late_steps` arrive."""
    late: list[Any] = []
    late_events = Recorder()
    events = Recorder(
        at_step=1,
        action=lambda: late.extend(engine.submit(request(late_steps), late_events) for _ in range(count)),
    )
    first = engine.submit(request(long_steps), events)
    result = first.future.result(60)
    return result, [t.future.result(60) for t in late], late_events


def started_batches(events: Recorder) -> list[int]:
    return [e["batch_size"] for e in events.events if e["event"] == "started"]


def test_a_joiner_that_would_slow_a_nearly_finished_batch_waits_for_it(make_engine: Any) -> None:
    # 3 iterations left for the running image: joining saves the newcomer 3 x c(1) = 3 and costs the
    # member (c(2) - c(1)) x 3 = 6, so it waits and starts alone right after.
    engine = make_engine(max_batch_size=4, admission="efficient", iteration_cost=STEEP.get)
    first, (late,), events = run_pair(engine, long_steps=4, late_steps=10)
    assert started_batches(events) == [1]
    assert first.batch_size == 1 and late.batch_size == 1
    assert engine.iterations == 4 + 10


def test_a_joiner_that_saves_a_long_wait_joins(make_engine: Any) -> None:
    # 19 left: joining saves 19 and costs (3 - 1) x min(19, 3) = 6.
    engine = make_engine(max_batch_size=4, admission="efficient", iteration_cost=STEEP.get)
    first, (late,), events = run_pair(engine, long_steps=20, late_steps=3)
    assert started_batches(events) == [2]
    assert engine.iterations == 20


def test_always_admission_joins_at_once(make_engine: Any) -> None:
    engine = make_engine(max_batch_size=4, iteration_cost=STEEP.get)  # "always", today's rule
    _, (late,), events = run_pair(engine, long_steps=4, late_steps=10)
    assert started_batches(events) == [2]
    assert engine.iterations == 1 + 10


def test_with_a_backlog_every_free_slot_fills(make_engine: Any) -> None:
    # Three arrive for two free slots: capacity matters more than order, so the rule stands aside.
    engine = make_engine(max_batch_size=3, admission="efficient", iteration_cost=STEEP.get)
    _, late, events = run_pair(engine, long_steps=4, late_steps=10, count=3)
    # Both free slots filled in one admission round (the "started" event counts as each joins).
    assert started_batches(events)[:2] == [2, 3]
    assert max(r.batch_size for r in late) == 3


def test_an_unmeasured_batch_size_is_tried(make_engine: Any) -> None:
    engine = make_engine(max_batch_size=4, admission="efficient", iteration_cost={1: 1.0}.get)
    _, _, events = run_pair(engine, long_steps=4, late_steps=10)
    assert started_batches(events) == [2]


def test_capped_a_joiner_that_buys_no_throughput_waits_for_the_running_request(make_engine: Any) -> None:
    # Proportional cost: the cap is one image, so the newcomer starts when the running one is done
    # (it would otherwise slow it down by its own share for no gain in images per second).
    engine = make_engine(max_batch_size=4, admission="capped", iteration_cost=PROPORTIONAL.get)
    first, (late,), events = run_pair(engine, long_steps=4, late_steps=10)
    assert started_batches(events) == [1]
    assert first.batch_size == 1 and late.batch_size == 1
    assert engine.iterations == 4 + 10


def test_capped_the_batch_grows_to_the_efficient_size_and_no_further(make_engine: Any) -> None:
    # Two arrive while one runs: the first joins (2 images: the cheap size), the second waits.
    engine = make_engine(max_batch_size=4, admission="capped", iteration_cost=KNEE_AT_2.get)
    first, late, events = run_pair(engine, long_steps=4, late_steps=10, count=2)
    assert started_batches(events) == [2, 2]
    assert max(r.batch_size for r in late) == 2
    assert engine._cap() == 2


def test_capped_admits_always_where_batching_is_cheap(make_engine: Any) -> None:
    engine = make_engine(max_batch_size=4, admission="capped", iteration_cost=CHEAP.get)
    _, late, events = run_pair(engine, long_steps=6, late_steps=10, count=3)
    assert started_batches(events) == [2, 3, 4]
    assert engine._cap() == 4


def test_capped_a_queue_deeper_than_a_batch_grows_the_cap(make_engine: Any) -> None:
    # Batch 2 gives 1.5% more images/s than batch 1: within the 2% slack, so one joiner waits; three
    # images waiting for a max batch of two shrink the slack to 1.3%, and the second slot fills.
    costs = {1: 1.0, 2: 1.97}
    engine = make_engine(max_batch_size=2, admission="capped", iteration_cost=costs.get)
    assert engine._cap() == 1
    _, (late,), events = run_pair(engine, long_steps=4, late_steps=10)
    assert started_batches(events) == [1]
    engine = make_engine(max_batch_size=2, admission="capped", iteration_cost=costs.get)
    _, late3, events = run_pair(engine, long_steps=4, late_steps=10, count=3)
    assert started_batches(events)[0] == 2
    assert max(r.batch_size for r in late3) == 2


def test_capped_an_unmeasured_batch_size_is_tried(make_engine: Any) -> None:
    engine = make_engine(max_batch_size=4, admission="capped", iteration_cost={1: 1.0}.get)
    _, _, events = run_pair(engine, long_steps=4, late_steps=10)
    assert started_batches(events) == [2]


def test_capped_measures_its_own_costs(make_engine: Any) -> None:
    # No injected curve: the engine's own timings fill the table the cap is computed from.
    engine = make_engine(max_batch_size=4, admission="capped")
    run_pair(engine, long_steps=4, late_steps=4)
    assert 1 in engine._measured_cost and 2 in engine._measured_cost
    assert 1 <= engine._cap() <= 4


def test_an_unknown_admission_is_refused(pipes: dict[str, Any]) -> None:
    import pytest

    from inference_server.continuous.core import ContinuousEngine

    with pytest.raises(ValueError, match="always, efficient, capped"):
        ContinuousEngine(pipes["inpaint"], admission="eager")  # type: ignore[arg-type]


def test_the_config_key_is_checked_at_start_up() -> None:
    import pytest

    from inference_server.config import load_config
    from inference_server.config_loader import ConfigError

    assert load_config({"batching": {"admission": "efficient"}}).batching.admission == "efficient"
    assert load_config({"batching": {"admission": "capped"}}).batching.admission == "capped"
    assert load_config({}).batching.admission == "always"
    with pytest.raises(ConfigError, match=r"\[batching\] admission: must be one of 'always', 'efficient'"):
        load_config({"batching": {"admission": "eager"}})
