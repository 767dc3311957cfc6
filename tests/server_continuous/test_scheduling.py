"""Iteration-level scheduling: joining mid-run, priority, cancellation, deadlines, progress, limits."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from inference_server.continuous.core import ContinuousRequest, RequestCancelled
from inference_server.engine import DeadlineExceeded, Overloaded
from tests.server_continuous.conftest import SIZE


def request(steps: int = 4, seeds: tuple[int, ...] = (1,), **kw: Any) -> ContinuousRequest:
    kw.setdefault("guidance", 5.0)
    return ContinuousRequest(
        task="txt2img", prompt=kw.pop("prompt", "x"), seeds=seeds, width=SIZE, height=SIZE, steps=steps, **kw
    )


class Recorder:
    """Collects a request's events (called on the worker thread) and can act at a given step."""

    def __init__(self, at_step: int | None = None, action: Any = None) -> None:
        self.events: list[dict[str, Any]] = []
        self.at_step, self.action = at_step, action
        self.fired = threading.Event()

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        if event["event"] == "progress" and event["step"] == self.at_step and not self.fired.is_set():
            self.fired.set()
            self.action()

    def kinds(self) -> list[str]:
        return [e["event"] for e in self.events]

    def steps(self) -> list[int]:
        return [e["step"] for e in self.events if e["event"] == "progress"]


def test_a_request_arriving_mid_run_joins_the_running_batch_and_leaves_first(make_engine: Any) -> None:
    engine = make_engine(max_batch_size=4)
    late: dict[str, Any] = {}
    finished: list[str] = []
    # Submitted from the long request's step-3 callback: it certainly arrives mid-run.
    long_events = Recorder(
        at_step=3, action=lambda: late.setdefault("ticket", engine.submit(request(3), late_events))
    )
    late_events = Recorder()
    long = engine.submit(request(30), long_events)
    long.future.add_done_callback(lambda f: finished.append("long"))
    assert long_events.fired.wait(60)
    late["ticket"].future.add_done_callback(lambda f: finished.append("late"))
    long_result = long.future.result(60)
    late_result = late["ticket"].future.result(60)
    assert finished == ["late", "long"]  # it did not wait for the 30-step request to finish
    assert late_events.kinds()[:2] == ["queued", "started"]
    assert late_events.events[1]["batch_size"] == 2  # joined the running batch
    assert late_result.iterations == 3 and long_result.iterations == 30
    assert long_result.batch_size == 2
    # The long request kept stepping while the other joined and left: one iteration per step.
    assert engine.iterations == 30
    assert long_events.steps() == list(range(1, 31))


def test_waiting_requests_join_by_priority_then_arrival(make_engine: Any) -> None:
    engine = make_engine(max_batch_size=1)
    order: list[str] = []
    tickets: dict[str, Any] = {}

    def queue_others() -> None:
        for name, priority in (("b", 5.0), ("c", 0.0), ("d", 5.0), ("e", -1.0)):
            tickets[name] = engine.submit(request(2, priority=priority))
            tickets[name].future.add_done_callback(lambda f, n=name: order.append(n))

    first = engine.submit(request(4), Recorder(at_step=1, action=queue_others))
    first.future.result(60)
    for t in tickets.values():
        t.future.result(60)
    assert order == ["e", "c", "b", "d"]


def test_queued_event_reports_position_by_priority(make_engine: Any) -> None:
    engine = make_engine(max_batch_size=1)
    positions: dict[str, int] = {}
    gate = threading.Event()

    def hold() -> None:
        # Submissions happen while the worker sits in this callback, so nobody can join meanwhile.
        for name, priority in (("low", 9.0), ("high", 1.0), ("mid", 5.0)):
            rec = Recorder()
            engine.submit(request(1, priority=priority), rec)
            positions[name] = rec.events[0]["position"]
        gate.set()

    engine.submit(request(3), Recorder(at_step=1, action=hold)).future.result(60)
    assert gate.is_set()
    assert positions == {"low": 0, "high": 0, "mid": 1}


def test_a_cancelled_request_leaves_at_the_next_step_and_frees_its_slot(make_engine: Any) -> None:
    engine = make_engine(max_batch_size=1)
    holder: dict[str, Any] = {}
    events = Recorder(at_step=2, action=lambda: engine.cancel(holder["doomed"]))
    holder["doomed"] = engine.submit(request(50), events)
    waiting = engine.submit(request(3))
    with pytest.raises(RequestCancelled):
        holder["doomed"].future.result(60)
    assert waiting.future.result(60).iterations == 3
    assert events.steps() == [1, 2]  # it stopped right after the cancelling step
    assert engine.iterations == 2 + 3  # the other 48 steps were never computed


def test_a_queued_request_can_be_cancelled_before_it_joins(make_engine: Any) -> None:
    engine = make_engine(max_batch_size=1)
    holder: dict[str, Any] = {}
    first = engine.submit(
        request(3),
        Recorder(at_step=1, action=lambda: engine.cancel(holder.setdefault("q", engine.submit(request(5))))),
    )
    first.future.result(60)
    with pytest.raises(RequestCancelled):
        holder["q"].future.result(60)
    assert engine.iterations == 3


def test_a_request_past_its_deadline_is_dropped_before_compute(make_engine: Any) -> None:
    engine = make_engine(max_batch_size=2)
    ticket = engine.submit(request(5, deadline=time.monotonic() - 1))
    with pytest.raises(DeadlineExceeded):
        ticket.future.result(60)
    assert engine.submit(request(2)).future.result(60).iterations == 2
    assert engine.iterations == 2


def test_images_of_one_request_join_as_slots_free_and_progress_counts_the_slowest(make_engine: Any) -> None:
    engine = make_engine(max_batch_size=2)
    events = Recorder()
    result = engine.submit(request(4, seeds=(1, 2, 3)), events).future.result(60)
    assert len(result.images) == 3 and result.images[0].size == (SIZE, SIZE)
    assert result.iterations == 8  # two images, then the third alone
    assert events.steps() == [1, 2, 3, 4]
    assert events.kinds()[:2] == ["queued", "started"]


def test_heun_progress_counts_steps_not_model_evaluations(make_engine: Any) -> None:
    engine = make_engine(max_batch_size=2)
    events = Recorder()
    result = engine.submit(request(5, scheduler="heun"), events).future.result(60)
    assert events.steps() == [1, 2, 3, 4, 5]
    assert result.iterations == 9  # Heun evaluates the model twice per step except the first


def test_a_full_queue_refuses_at_once(make_engine: Any) -> None:
    engine = make_engine(max_batch_size=1, max_queue=1)
    gate = threading.Event()
    outcome: dict[str, Any] = {}

    def flood() -> None:
        engine.submit(request(1))
        try:
            engine.submit(request(1))
        except Overloaded as e:
            outcome["error"] = e
        gate.set()

    engine.submit(request(3), Recorder(at_step=1, action=flood)).future.result(60)
    assert gate.wait(60)
    assert "queue is full" in outcome["error"].message


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"steps": 0}, "steps"),
        ({"width": SIZE + 3}, "width"),
        ({"task": "img2img"}, "image"),
        ({"seeds": ()}, "seeds"),
    ],
)
def test_bad_requests_are_refused_with_the_field_named(
    make_engine: Any, change: dict[str, Any], field: str
) -> None:
    from dataclasses import replace

    from inference_server.continuous.core import UnsupportedRequest

    engine = make_engine(max_batch_size=1)
    with pytest.raises(UnsupportedRequest, match=field):
        engine.submit(replace(request(2), **change))


async def test_generate_delivers_events_on_the_loop_and_cancels_when_the_caller_gives_up(
    make_engine: Any,
) -> None:
    import asyncio

    engine = make_engine(max_batch_size=2)
    loop_thread = threading.get_ident()
    seen: list[tuple[str, bool]] = []
    result = await engine.generate(
        request(3), lambda ev: seen.append((ev["event"], threading.get_ident() == loop_thread))
    )
    assert len(result.images) == 1
    assert [k for k, _ in seen] == ["queued", "started", "progress", "progress", "progress"]
    assert all(on_loop for _, on_loop in seen)
    # A 200-step request joins a running 3-step one and is given up while the worker is held in the
    # other's step-2 callback: how many steps it computes no longer depends on how quickly this
    # (maybe loaded) machine's loop gets to the cancel, since a tiny model's step takes under 1 ms.
    loop = asyncio.get_running_loop()
    queued, cancelled = threading.Event(), threading.Event()
    started = asyncio.Event()
    tasks: list[asyncio.Task] = []

    def on_event(ev: dict[str, Any]) -> None:  # on the loop
        if ev["event"] == "queued":
            queued.set()
        elif ev["event"] == "started":
            started.set()

    def on_first(ev: dict[str, Any]) -> None:  # on the worker thread
        if ev["event"] == "progress" and ev["step"] == 1:
            loop.call_soon_threadsafe(
                lambda: tasks.append(loop.create_task(engine.generate(request(200), on_event)))
            )
            assert queued.wait(60)  # it joins at the next iteration
        elif ev["event"] == "progress" and ev["step"] == 2:
            assert cancelled.wait(60)  # hold the worker until the caller has given up

    first = engine.submit(request(3), on_first)
    await asyncio.wait_for(started.wait(), 60)
    [task] = tasks
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    cancelled.set()
    assert (await asyncio.wait_for(asyncio.wrap_future(first.future), 60)).iterations == 3
    # The abandoned 200-step request left the batch after the one step it shared; the next request
    # runs right after it.
    await asyncio.wait_for(engine.generate(request(1)), 60)
    assert engine.iterations == 3 + 3 + 1


def test_out_of_memory_halves_the_running_batch_and_every_image_stays_exact(
    pipes: dict[str, Any], make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np
    import torch

    from inference_server.continuous.engine import scheduler_factory
    from tests.server_continuous.parity import reference

    unet = pipes["inpaint"].unet
    real_forward = unet.forward
    calls: list[int] = []

    def forward_with_little_memory(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(sample.shape[0])
        if sample.shape[0] > 4:  # room for two CFG images at most
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(sample, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", forward_with_little_memory)
    engine = make_engine(max_batch_size=4)
    reqs = [request(3, seeds=(10 + i,), prompt=f"p{i}", scheduler="euler_a") for i in range(4)]
    tickets = [engine.submit(r) for r in reqs]
    results = [t.future.result(60) for t in tickets]
    monkeypatch.undo()
    assert engine._limit == 2
    assert max(calls) > 4 and calls[-1] <= 4  # it tried, failed, and carried on with fewer rows
    factory = scheduler_factory(pipes["inpaint"])
    for r, res in zip(reqs, results, strict=True):
        assert float(np.abs(reference(pipes, factory, r, r.seeds[0]) - res.arrays[0]).max()) < 1e-4


def test_a_model_error_fails_the_requests_in_that_call_and_the_engine_keeps_serving(
    pipes: dict[str, Any], make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from inference_server.engine import GenerationFailed

    unet = pipes["inpaint"].unet
    real_forward = unet.forward
    broken = threading.Event()
    broken.set()

    def flaky_forward(*args: Any, **kwargs: Any) -> Any:
        if broken.is_set():
            raise RuntimeError("device lost (simulated)")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(unet, "forward", flaky_forward)
    engine = make_engine(max_batch_size=2)
    with pytest.raises(GenerationFailed, match="model failed"):
        engine.submit(request(3)).future.result(60)
    broken.clear()
    assert len(engine.submit(request(2)).future.result(60).images) == 1


def test_the_pixel_budget_bounds_the_images_stepping_together(make_engine: Any) -> None:
    engine = make_engine(max_batch_size=8, max_batch_pixels=2 * SIZE * SIZE)
    events = [Recorder() for _ in range(3)]
    tickets = [engine.submit(request(3, seeds=(i,)), ev) for i, ev in enumerate(events)]
    results = [t.future.result(60) for t in tickets]
    assert [r.batch_size for r in results] == [2, 2, 1]
    # An image larger than the whole budget still runs, alone.
    big = engine.submit(replace_size(request(2), 2 * SIZE)).future.result(60)
    assert big.images[0].size == (2 * SIZE, 2 * SIZE) and big.batch_size == 1


def replace_size(req: ContinuousRequest, side: int) -> ContinuousRequest:
    from dataclasses import replace

    return replace(req, width=side, height=side)


def test_waiting_requests_hear_their_new_position_when_others_join(make_engine: Any) -> None:
    engine = make_engine(max_batch_size=1)
    recorders: list[Recorder] = []

    def queue_three() -> None:
        for _ in range(3):
            recorders.append(Recorder())
            engine.submit(request(1), recorders[-1])

    engine.submit(request(2), Recorder(at_step=1, action=queue_three)).future.result(60)
    deadline = time.monotonic() + 60
    while engine.requests_done < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.requests_done == 4
    last = [[e["position"] for e in r.events if e["event"] == "queued"] for r in recorders]
    assert last == [[0], [1, 0], [2, 1, 0]]


def test_decoding_runs_off_the_denoising_thread_and_a_decode_failure_fails_only_its_request(
    pipes: dict[str, Any], make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from inference_server.engine import GenerationFailed

    vae = pipes["inpaint"].vae
    real_decode = vae.decode
    threads: list[str] = []
    fail_next = threading.Event()  # decoding fails while set

    def decode(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        if fail_next.is_set():
            raise RuntimeError("decoder broke (simulated)")
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(vae, "decode", decode)
    engine = make_engine(max_batch_size=4)
    assert len(engine.submit(request(2)).future.result(60).images) == 1
    assert threads and all(name.startswith("continuous-decode") for name in threads)

    # The decoder fails on this request's images (together, and each alone when retried), so the
    # request fails as a whole; its other image leaves the running batch and the engine keeps serving.
    fail_next.set()
    two = engine.submit(request(3, seeds=(1, 2)))
    with pytest.raises(GenerationFailed, match="model failed"):
        two.future.result(60)
    fail_next.clear()
    assert len(engine.submit(request(2, seeds=(5, 6))).future.result(60).images) == 2
    deadline = time.monotonic() + 60
    while engine.running_samples and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.running_samples == 0


def test_prompt_embeddings_are_reused_and_give_identical_images(
    pipes: dict[str, Any], make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoder = pipes["inpaint"].text_encoder
    real_forward = encoder.forward
    calls = []

    def forward(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(encoder, "forward", forward)
    engine = make_engine()
    first = engine.submit(request(2, prompt="a red circle", seeds=(3,))).future.result(60)
    assert len(calls) == 2  # the prompt and the (empty) negative prompt
    again = engine.submit(request(2, prompt="a red circle", seeds=(3,))).future.result(60)
    assert len(calls) == 2  # both from the cache
    engine.submit(request(2, prompt="a blue square", seeds=(3,))).future.result(60)
    assert len(calls) == 3  # only the new prompt; the empty negative prompt is cached
    assert (first.arrays[0] == again.arrays[0]).all()
