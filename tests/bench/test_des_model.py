"""The discrete-event model of the two engines, on cases whose answer is known."""

import statistics

import pytest

from tests.bench.des_model import (
    FLUX_LIKE,
    SD15_A100,
    SDXL_A100,
    Arrivals,
    Capped,
    ClosedLoop,
    Costs,
    Curve,
    EngineConfig,
    PaysForItself,
    Policy,
    affine_gpu,
    fifo_lower_bound,
    poisson,
    ratio_for_speedup,
    saturation,
    simulate_continuous,
    simulate_request_level,
    steady_rate,
    workload,
)

STEP = 0.01
DECODE = 0.02


def constant(parallel: bool = False) -> Costs:
    """Every step costs STEP whatever the batch; decoding DECODE per call / per departing group."""
    flat = Curve.affine(STEP, 0.0)
    decode = Curve.affine(DECODE, 0.0)
    return Costs("constant", step=flat, rl_call_fixed=decode, decode=decode, decode_parallel=parallel)


def test_curve_interpolates_and_extends_linearly() -> None:
    c = Curve(((1.0, 1.0), (4.0, 2.5), (16.0, 4.0)))
    assert c(1) == 1.0
    assert c(2) == pytest.approx(1.5)
    assert c(10) == pytest.approx(3.25)
    assert c(20) == pytest.approx(4.5)  # past the last point: the last segment's slope
    assert Curve.affine(0.5, 0.25)(4) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="increasing"):
        Curve(((2.0, 1.0), (1.0, 2.0)))


def test_at_batch_one_both_engines_give_every_request_the_same_latency() -> None:
    cfg = EngineConfig(max_batch=1, max_wait_s=0.05)
    schedule = poisson(rate=3.0, n=400, steps=workload("mixed"), seed=3)
    rl = simulate_request_level(Arrivals(schedule), constant(), cfg)
    cont = simulate_continuous(Arrivals(schedule), constant(), cfg)
    for a, b in zip(rl, cont, strict=True):
        assert a.done == pytest.approx(b.done)
        assert a.start == pytest.approx(b.start)


def test_one_at_a_time_matches_the_md1_queue() -> None:
    """Batch 1, Poisson arrivals, deterministic service D: mean wait rho D / (2 (1 - rho))."""
    service = 20 * STEP + DECODE
    rho = 0.6
    schedule = poisson(rate=rho / service, n=40_000, steps=workload("20"), seed=5)
    done = simulate_request_level(Arrivals(schedule), constant(), EngineConfig(max_batch=1))
    mean_wait = statistics.mean(r.start - r.arrival for r in done)
    assert mean_wait == pytest.approx(rho * service / (2 * (1 - rho)), rel=0.05)
    assert all(r.done - r.start == pytest.approx(service) for r in done)


def test_request_level_saturation_is_a_full_batch_per_call() -> None:
    cfg = EngineConfig(max_batch=8)
    call = 20 * STEP + DECODE
    assert saturation("request-level", constant(), cfg, "20") == pytest.approx(8 / call, rel=1e-6)


def test_continuous_lets_a_newcomer_join_at_the_next_step() -> None:
    """One request at t = 0; a second arrives in the middle of the first's 11th step: it starts when
    that step ends, and the first's decode (same device) delays its last 11 steps."""
    cfg = EngineConfig(max_batch=8)
    arrivals = [(0.0, 20), (10.5 * STEP, 20)]
    first, second = simulate_continuous(Arrivals(arrivals), constant(), cfg)
    assert first.start == 0.0
    assert second.start == pytest.approx(11 * STEP)
    assert first.done == pytest.approx(20 * STEP + DECODE)
    assert second.done == pytest.approx(31 * STEP + 2 * DECODE)
    # the request-level engine: the first waits max_wait (50 ms) for company; the second, arrived
    # after that, waits for the whole first call, then max_wait again (counted from when the device
    # became free, as the batcher does)
    first, second = simulate_request_level(Arrivals(arrivals), constant(), cfg)
    assert first.start == pytest.approx(0.05)
    assert second.start == pytest.approx(first.done + 0.05)


def test_request_level_waits_for_company_up_to_max_wait() -> None:
    cfg = EngineConfig(max_batch=8, max_wait_s=0.05, adaptive_wait=False)
    a, b = simulate_request_level(Arrivals([(0.0, 20), (0.03, 20)]), constant(), cfg)
    assert a.start == b.start == pytest.approx(0.05)  # nobody else came: the wait ran out
    lone = simulate_request_level(Arrivals([(0.0, 20)]), constant(), cfg)[0]
    assert lone.start == pytest.approx(0.05)


def test_request_level_batches_only_equal_step_counts() -> None:
    cfg = EngineConfig(max_batch=8, max_wait_s=0.0)
    reqs = simulate_request_level(Arrivals([(0.0, 10), (0.0, 20), (0.0, 10)]), constant(), cfg)
    assert reqs[0].start == reqs[2].start < reqs[1].start


def test_with_a_flat_curve_the_pays_for_itself_rule_admits_like_greedy() -> None:
    """When a joiner slows nobody (c(n + 1) = c(n)) it always pays for itself."""
    cfg = EngineConfig(max_batch=8)
    schedule = poisson(rate=20.0, n=500, steps=workload("mixed"), seed=9)
    greedy = simulate_continuous(Arrivals(schedule), constant(), cfg, Policy())
    pays = simulate_continuous(Arrivals(schedule), constant(), cfg, PaysForItself())
    assert [r.done for r in greedy] == [r.done for r in pays]


def test_closed_loop_keeps_its_clients_busy_and_counts_the_steady_part() -> None:
    source = ClosedLoop(clients=4, total=40, steps=workload("20"))
    done = simulate_continuous(source, constant(parallel=True), EngineConfig(max_batch=4))
    assert len(done) == 40
    # 4 clients, 4 slots, decode beside the denoising: each client's cycle is its 20 steps, its
    # decode (2 steps' time) and then the next iteration boundary: 4 images per 22 steps
    rate = steady_rate(sorted(r.done for r in done), clients=4)
    assert rate == pytest.approx(4 / (22 * STEP), rel=0.02)
    with pytest.raises(ValueError, match="too few"):
        steady_rate([1.0, 2.0], clients=4)


def test_linear_cost_gives_continuous_no_throughput_gain() -> None:
    """c(n) = b n: batching saves nothing, so both engines saturate at one image per 20 b."""
    linear = Costs("linear", step=Curve.affine(0.0, STEP), rl_call_fixed=Curve.zero(), decode_parallel=True)
    cfg = EngineConfig(max_batch=8)
    for engine in ("request-level", "continuous"):
        assert saturation(engine, linear, cfg, "20", total=800) == pytest.approx(1 / (20 * STEP), rel=0.02)


def test_decode_batching_decodes_images_finished_apart_together() -> None:
    cfg = EngineConfig(max_batch=8, decode_batch=2, decode_wait_s=1.0)
    first, second = simulate_continuous(Arrivals([(0.0, 20), (1.5 * STEP, 20)]), constant(), cfg)
    assert second.start == pytest.approx(2 * STEP)
    # the first finishes denoising at step 20 and waits for the second (step 22): one decode
    assert first.done == second.done == pytest.approx(22 * STEP + DECODE)


def test_affine_curves_reproduce_the_published_batching_gains() -> None:
    """The a/b fitted to a published batch-n speedup gives that speedup back; the published curves'
    batch-8 gains sit between proportional (1x) and flat (8x) where the fits say."""
    for n, speedup in ((16, 2.25), (16, 1.19), (2, 1.02)):
        costs = affine_gpu(ratio_for_speedup(n, speedup))
        assert n * costs.step(1) / costs.step(n) == pytest.approx(speedup)
    assert ratio_for_speedup(16, 2.25) == pytest.approx(1.45, abs=0.01)  # SD 1.5, A100
    assert ratio_for_speedup(16, 1.19) == pytest.approx(0.2, abs=0.01)  # SDXL, A100
    assert ratio_for_speedup(2, 1.02) == pytest.approx(0.04, abs=0.001)  # Qwen-Image, H200

    def gain(costs: Costs) -> float:
        return 8 * costs.step(1) / costs.step(8)

    assert 1.0 < gain(FLUX_LIKE) < gain(SDXL_A100) < gain(SD15_A100) < 8.0


def test_capped_stops_the_batch_where_a_bigger_one_buys_no_throughput() -> None:
    assert Capped().cap(affine_gpu(0.0)) == 1  # proportional: one at a time loses nothing
    assert Capped().cap(affine_gpu(1000.0)) == 8  # flat: the whole batch
    assert Capped().cap(SDXL_A100) in range(2, 8)
    # with the cap at 1, a request arriving mid-run waits for the running one to finish
    first, second = simulate_continuous(
        Arrivals([(0.0, 20), (0.5, 20)]), affine_gpu(0.0), EngineConfig(max_batch=8), Capped()
    )
    assert second.start == pytest.approx(first.done)


def test_capped_grows_toward_the_most_efficient_size_as_the_queue_deepens() -> None:
    # batch 8 gives 3% more images/s than batch 1 (a/b = 0.04, FLUX-class): a short queue runs
    # 2 at a time (within 2%), a queue of 32 (slack 0.5%) nearly the most efficient size
    costs = affine_gpu(0.04)
    assert Capped().cap(costs, waiting=0) == Capped().cap(costs, waiting=8) == 2
    assert 2 < Capped().cap(costs, waiting=32) < 8
    # exactly proportional: no queue makes a bigger batch worth it
    assert Capped().cap(affine_gpu(0.0), waiting=100) == 1


@pytest.mark.parametrize("ratio", [0.0, 0.2, 1.4, 1000.0])
def test_the_lower_bound_holds_for_every_request_of_both_engines(ratio: float) -> None:
    """No engine finishes an equal-step request sooner than the bound says, under any policy."""
    costs = affine_gpu(ratio)
    cfg = EngineConfig(max_batch=8)
    rate = 0.8 * saturation("request-level", costs, cfg, "20", total=400)
    schedule = poisson(rate=rate, n=600, steps=workload("20"), seed=4)
    bound = fifo_lower_bound(schedule, costs, cfg)
    runs = [simulate_request_level(Arrivals(schedule), costs, cfg)]
    runs += [
        simulate_continuous(Arrivals(schedule), costs, cfg, p) for p in (Policy(), Capped(), PaysForItself())
    ]
    for requests in runs:
        for b, r in zip(bound, requests, strict=True):
            assert r.done - r.arrival >= b - 1e-9
    # and it is not vacuous: at 80% load some requests queue beyond their service time
    assert max(bound) > 20 * costs.step(1) + costs.decode(1)
