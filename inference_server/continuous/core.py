"""Continuous (iteration-level) batching for every model family the server serves.

With request-level batching a request that arrives while a batch runs waits for every step of that
batch. Here the unit of scheduling is one denoising step: every iteration makes one batched denoiser
call for all running samples (guidance rows included) with a per-row timestep; each sample then
steps its own scheduler on its own slice. Finished samples leave and are decoded, cancelled or
expired ones leave at the next step, and waiting requests join at the next iteration, so samples with
different step counts, schedulers, guidance scales, strengths and tasks share iterations. Only the
image size must match for two samples to share a denoiser call (different sizes run as separate
calls in the same iteration).

Each image of a request is one *sample* with its own `torch.Generator(seed)` and its own scheduler
instance (schedulers are stateful and `set_timesteps` resets them), so every sample follows exactly the
computation and random stream of a diffusers pipeline call for a batch of one with that seed, whatever
else shares its iterations. What differs between model families (SD 1.x/2.x and SDXL UNets, SD 3.x
and FLUX.1 flow-matching transformers) is in a per-family `Denoiser` (`denoiser.py`, `unet.py`,
`flow.py`); this module decides who runs and never looks inside the model. Step caching is per
sample too: a request's level gives each of its samples a `SampleCache` (`caching.py`), and the
family's `predict_cached` decides per sample, at every step, what it recomputes. Multi-evaluation samplers (Heun, KDPM2) work unchanged: their scheduler
keeps the sub-step state and each entry of its `timesteps` is one model evaluation, i.e. one iteration.

The denoising loop runs on one dedicated worker thread (schedulers and tokenizers are not
thread-safe). Finished latents go to a second thread for VAE decoding and image conversion, so the
running batch doesn't stall for every image that leaves it: on a CPU the decode of one image costs
about as much as a denoising step, and on any device it is off the critical path of everyone still
denoising. The asyncio side only submits requests and receives events and results. This module never
imports aiohttp.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from inference_server.continuous.caching import SampleCache
from inference_server.continuous.denoiser import Blend, Denoiser, Prompt
from inference_server.engine import (
    TASKS,
    DeadlineExceeded,
    EngineError,
    GenerationFailed,
    OutOfMemory,
    Overloaded,
    ShuttingDown,
    Task,
)
from inference_server.pipelines import MODEL_FAILED
from inference_server.pipelines import scheduler_factory as named_scheduler_factory
from inference_server.previews import Previewer, due, previewer_for, safe_pngs
from inference_server.step_cache import level_problem

log = logging.getLogger(__name__)

EventSink = Callable[[dict[str, Any]], None]
SchedulerFactory = Callable[[str | None], Any]
Admission = Literal["always", "efficient", "capped"]
ADMISSIONS: tuple[Admission, ...] = ("always", "efficient", "capped")
# Seconds of one iteration of n images, or None when not known yet.
IterationCost = Callable[[int], float | None]

# Weight of the newest iteration in the measured cost of an iteration of n images ("efficient"
# admission): recent enough to follow a change of sizes or load, smooth enough not to chase noise.
COST_SMOOTHING = 0.2
# "capped" admission: the running batch stops growing at the smallest size whose measured images per
# second are within this fraction of the best measured size's (the fraction shrinks as the queue
# grows past a full batch). Past it a joiner buys (almost) no throughput and slows every member by
# its own share; 2% is where tests/bench/des_model.py found the cap helping on nearly proportional
# curves (SDXL, FLUX) without costing capacity at 90% load.
CAP_THROUGHPUT_SLACK = 0.02

# Prompt embeddings kept for reuse (re-rolls, variations and the empty negative prompt repeat): a few
# MB for SD-sized encoders, and one text-encoder call fewer per request that hits.
EMBED_CACHE_SIZE = 64


class RequestCancelled(EngineError):
    """The submitter gave up (client gone); nobody reads this error, it only ends the future."""

    kind = "cancelled"


class UnsupportedRequest(EngineError):
    """The continuous engine can't run this request or model; the message names what."""

    kind = "invalid_request"


class UnsupportedModel(UnsupportedRequest):
    """The continuous engine can't run this model at all (the server falls back to request level)."""


@dataclass(frozen=True)
class ContinuousRequest:
    """One generation request: `len(seeds)` images of one prompt; image i uses `seeds[i]`."""

    task: Task
    prompt: str
    seeds: tuple[int, ...]
    width: int
    height: int
    steps: int
    guidance: float
    negative_prompt: str | None = None
    scheduler: str | None = None  # name for the scheduler factory; None/"default" = the pipeline's own
    strength: float = 1.0  # img2img / inpaint: how far back into the noise schedule to start
    image: Any = None  # PIL image for img2img / inpaint, already width x height
    mask: Any = None  # PIL mask for inpaint: white = repaint, black = keep
    # FLUX: true classifier-free guidance at this scale when > 1 and a negative prompt is given.
    true_cfg: float | None = None
    # Lower joins first (ties: arrival order). The bot passes its fairness order here.
    priority: float = 0.0
    deadline: float | None = None  # time.monotonic() after which the request is dropped
    preview_every: int = 0  # a "preview" event per image every this many steps (0 = none)
    # Step caching level (step_cache.py): each image keeps its own cache state (caching.py), so
    # images at any level, or none, share iterations.
    cache: str = "off"


@dataclass
class ContinuousResult:
    images: list[Any]  # PIL images, one per seed, in seed order
    arrays: list[Any]  # the same as float numpy arrays HxWx3 in [0, 1] (diffusers' output_type="np")
    seeds: tuple[int, ...]
    queue_s: float
    run_s: float
    total_s: float
    batch_size: int  # largest number of samples that shared an iteration with this request
    iterations: int  # iterations this request took part in


@dataclass(eq=False)  # identity: tickets hold tensors and futures
class _Ticket:
    request: ContinuousRequest
    seq: int
    future: concurrent.futures.Future
    on_event: EventSink | None
    total_steps: int
    submitted: float
    cancelled: threading.Event = field(default_factory=threading.Event)
    next_sample: int = 0  # index of the next seed to admit
    samples: list[_Sample] = field(default_factory=list)
    started: float | None = None
    finished_arrays: dict[int, Any] = field(default_factory=dict)
    reported_step: int = 0
    last_position: int = -1
    max_batch: int = 0
    iterations: int = 0
    prompt: Prompt | None = None  # encoded once, when the request is first admitted

    @property
    def sort_key(self) -> tuple[float, int]:
        return (self.request.priority, self.seq)

    def emit(self, event: dict[str, Any]) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(event)
        except Exception:  # a broken listener must not stop the engine
            log.exception("continuous: event listener failed")


@dataclass(eq=False)
class _Sample:
    ticket: _Ticket
    index: int
    scheduler: Any
    generator: torch.Generator
    timesteps: torch.Tensor
    num_steps: int  # pipeline steps (progress units); len(timesteps) = evaluations
    warmup: int
    latents: torch.Tensor
    prompt: Prompt
    guidance: float
    step_kwargs: dict[str, Any]
    blend: Blend | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # the family's per-sample conditioning
    cache: SampleCache | None = None  # step-cache state; None = uncached (or finished: dropped)
    i: int = 0  # next entry of `timesteps`
    steps_done: int = 0

    @property
    def size(self) -> tuple[int, int]:
        return (self.ticket.request.height, self.ticket.request.width)


def default_scheduler_factory(pipe: Any) -> SchedulerFactory:
    """Fresh instances of the pipeline's own scheduler class; names are not understood."""
    make_named = named_scheduler_factory(pipe.scheduler)  # copies one prepared instance per name

    def make(name: str | None) -> Any:
        if name not in (None, "default"):
            raise UnsupportedRequest(f"unknown scheduler {name!r}")
        return make_named(None)

    return make


class ContinuousEngine:
    """Iteration-level scheduler over a diffusers pipeline of any served family.

    `pipe` is the family's inpainting pipeline (made with `from_pipe`, it shares every module with the
    text-to-image and image-to-image ones and has every processor the three tasks need); a
    text-to-image SD pipeline works too. `families.denoiser_for` says which models it can run.
    """

    name = "continuous"

    def __init__(
        self,
        pipe: Any,
        *,
        max_batch_size: int = 8,
        # Sum of width x height over the images stepping together: bounds device memory per denoiser
        # call when sizes differ (the server passes `[batching] max_batch_pixels`).
        max_batch_pixels: int = 8 * 512 * 512,
        # Waiting requests beyond this are refused at once (503 + Retry-After) rather than queued
        # for minutes; the server passes `[batching] max_queue`.
        max_queue: int = 256,
        scheduler_factory: SchedulerFactory | None = None,
        on_iteration: Callable[[int, float], None] | None = None,
        # "always": waiting requests fill free slots at every step. "efficient": see _pays_to_join.
        # "capped": see _under_cap.
        admission: Admission = "always",
        # The cost of an iteration of n images for "efficient" and "capped"; None = measured here.
        iteration_cost: IterationCost | None = None,
        # Decode finished latents on a second thread (see the module docstring). Off for MPS, whose
        # backend is not safe to drive from two threads.
        decode_thread: bool = True,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        from inference_server.continuous.families import denoiser_for, unsupported_reason

        reason = unsupported_reason(pipe)
        if reason is not None:
            raise UnsupportedModel(reason)
        self.pipe = pipe
        self.denoiser: Denoiser = denoiser_for(pipe)
        self._previewer: Previewer | None = None  # made on the first preview (it may fit one)
        self.max_batch_size = max_batch_size
        self.max_batch_pixels = max_batch_pixels
        self.max_queue = max_queue
        if admission not in ADMISSIONS:
            raise ValueError(f"admission must be one of {', '.join(ADMISSIONS)}, got {admission!r}")
        self.admission = admission
        self._measured_cost: dict[int, float] = {}  # images per iteration -> seconds (smoothed)
        self._iteration_cost = iteration_cost or self._measured_cost.get
        self._make_scheduler = scheduler_factory or default_scheduler_factory(pipe)
        self._on_iteration = on_iteration
        self._cond = threading.Condition()
        self._waiting: list[tuple[tuple[float, int], _Ticket]] = []  # heap by (priority, arrival)
        self._running: list[_Sample] = []  # in join order; only the first `_limit` step
        # Lowered after an out-of-memory error, raised again step by step (see _on_unet_failure).
        self._limit = max_batch_size
        self._ok_iterations = 0
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        # text -> the family's embeddings of it
        self._embed_cache: OrderedDict[str, tuple[torch.Tensor, ...]] = OrderedDict()
        self._decode_thread = decode_thread
        self._decoder: concurrent.futures.ThreadPoolExecutor | None = None
        # Counters for /metrics and the bench; written by the worker, read anywhere.
        self.iterations = 0
        self.samples_done = 0
        self.requests_done = 0
        self.busy_s = 0.0
        # Step caching: sample-steps that ran the whole network / reused cached work (finished samples).
        self.cache_full_steps = 0
        self.cache_reused_steps = 0

    # ----- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        if self._decode_thread:
            threads = torch.get_num_threads()
            self._decoder = concurrent.futures.ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix="continuous-decode",
                # The same intra-op thread count as the caller's (the configured cpu_threads).
                initializer=lambda: torch.set_num_threads(threads),
            )
        self._thread = threading.Thread(target=self._worker, name="continuous-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the worker; requests still waiting or running fail with ShuttingDown."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._decoder is not None:
            # Samples that finished denoising still get their images.
            self._decoder.shutdown(wait=True)
            self._decoder = None

    async def aclose(self) -> None:
        await asyncio.to_thread(self.stop)

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._waiting)

    @property
    def running_samples(self) -> int:
        return len(self._running)

    # ----- submission (any thread) -------------------------------------------------------------

    def validate(self, request: ContinuousRequest) -> None:
        """Raise UnsupportedRequest naming the field when the engine can't run `request`."""
        if request.task not in TASKS:
            raise UnsupportedRequest(f"unknown task {request.task!r}")
        if not request.seeds:
            raise UnsupportedRequest("seeds: at least one seed is needed")
        if request.steps < 1:
            raise UnsupportedRequest("steps must be >= 1")
        f = self.denoiser.size_multiple
        if request.width % f or request.height % f:
            raise UnsupportedRequest(f"width and height must be multiples of {f}")
        problem = self.denoiser.check(request)
        if problem is not None:
            raise UnsupportedRequest(problem)
        if request.task != "txt2img":
            if request.image is None:
                raise UnsupportedRequest("image is required for img2img and inpaint")
            if not 0.0 < request.strength <= 1.0:
                raise UnsupportedRequest("strength must be in (0, 1]")
            if self.denoiser.effective_steps(request.steps, request.strength, request.task) < 1:
                raise UnsupportedRequest(
                    f"strength {request.strength} x steps {request.steps} leaves no denoising step"
                )
        if request.task == "inpaint" and request.mask is None:
            raise UnsupportedRequest("mask is required for inpaint")
        cache_problem = level_problem(request.cache)
        if cache_problem is not None:
            raise UnsupportedRequest(f"cache {cache_problem}")

    def submit(self, request: ContinuousRequest, on_event: EventSink | None = None) -> _Ticket:
        """Queue `request`; returns a ticket whose `future` resolves to a ContinuousResult.

        `on_event` is called from the worker thread with {"event": "queued"|"started"|"progress", ...}.
        """
        self.validate(request)
        with self._cond:
            if self._stopping or self._thread is None:
                raise ShuttingDown("the continuous engine is not running")
            if len(self._waiting) >= self.max_queue:
                raise Overloaded(f"the queue is full ({self.max_queue} requests waiting)")
            ticket = _Ticket(
                request=request,
                seq=next(self._seq),
                future=concurrent.futures.Future(),
                on_event=on_event,
                total_steps=self.denoiser.effective_steps(request.steps, request.strength, request.task),
                submitted=time.monotonic(),
            )
            position = sum(1 for key, _ in self._waiting if key < ticket.sort_key)
            ticket.last_position = position
            heapq.heappush(self._waiting, (ticket.sort_key, ticket))
            self._cond.notify_all()
        ticket.emit({"event": "queued", "position": position})
        return ticket

    def cancel(self, ticket: _Ticket) -> None:
        """The request leaves at the next iteration (or before joining) and frees its slots."""
        ticket.cancelled.set()
        with self._cond:
            self._cond.notify_all()

    async def generate(
        self, request: ContinuousRequest, on_event: EventSink | None = None
    ) -> ContinuousResult:
        """Submit and await the result; events are delivered on the caller's event loop.

        Cancelling the awaiting task (e.g. the client disconnected) cancels the request in the engine.
        """
        loop = asyncio.get_running_loop()
        listener = on_event

        def sink(event: dict[str, Any]) -> None:
            if listener is not None:
                loop.call_soon_threadsafe(listener, event)

        ticket = self.submit(request, sink if listener is not None else None)
        try:
            return await asyncio.wrap_future(ticket.future)
        except asyncio.CancelledError:
            self.cancel(ticket)
            raise

    # ----- worker thread -----------------------------------------------------------------------

    def _worker(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._cond:
                        while not self._stopping and not self._waiting and not self._running:
                            self._cond.wait()
                        if self._stopping:
                            break
                        joiners = self._pick_joiners()
                        moved = self._positions_changed() if joiners else []
                    for ticket, position in moved:
                        ticket.emit({"event": "queued", "position": position})
                    t0 = time.perf_counter()
                    for ticket, count in joiners:
                        self._admit(ticket, count)
                    self._drop_cancelled()
                    if self._running:
                        self._iteration()
                    self.busy_s += time.perf_counter() - t0
        except BaseException:  # a device failure: fail everybody rather than hang them
            log.exception("continuous engine worker died")
            self._fail_all(GenerationFailed(MODEL_FAILED))
            return
        self._fail_all(ShuttingDown("the server shut down before this request finished"))

    def _fail_all(self, error: EngineError) -> None:
        with self._cond:
            tickets = {id(s.ticket): s.ticket for s in self._running}
            tickets.update({id(t): t for _, t in self._waiting})
            self._waiting.clear()
            self._running.clear()
        for t in tickets.values():
            _set_exception(t.future, error)

    def _pick_joiners(self) -> list[tuple[_Ticket, int]]:
        """Pop waiting requests (lowest priority value first) into the free slots; holds the lock.

        A request with several images may join partly; its other images join as slots free up, ahead
        of later requests of the same priority.
        """
        free = self._limit - len(self._running)
        pixels_free = self.max_batch_pixels - sum(s.size[0] * s.size[1] for s in self._running)
        now = time.monotonic()
        joiners: list[tuple[_Ticket, int]] = []
        while self._waiting and free > 0:
            _, ticket = self._waiting[0]
            if ticket.cancelled.is_set():
                heapq.heappop(self._waiting)
                if ticket.next_sample == 0 or not ticket.samples:
                    _set_exception(ticket.future, RequestCancelled("request cancelled"))
                continue
            if ticket.request.deadline is not None and now > ticket.request.deadline:
                heapq.heappop(self._waiting)
                ticket.cancelled.set()
                _set_exception(
                    ticket.future, DeadlineExceeded("deadline passed before the request could run")
                )
                continue
            remaining = len(ticket.request.seeds) - ticket.next_sample
            per_image = ticket.request.width * ticket.request.height
            take = min(remaining, free, pixels_free // per_image)
            if take == 0 and not self._running and not joiners:
                take = 1  # an image bigger than the budget still runs, alone
            if take == 0:
                break  # waits, at the head, for pixels to free up
            backlog = len(self._waiting) > free
            if (
                self.admission == "efficient"
                and not backlog
                and not self._pays_to_join(ticket, take, joiners)
            ):
                break  # FIFO: nobody overtakes a deferred older request
            if self.admission == "capped" and not self._under_cap(take, joiners):
                break  # FIFO, as above
            joiners.append((ticket, take))
            free -= take
            pixels_free -= take * per_image
            if take == remaining:
                heapq.heappop(self._waiting)
            else:
                break  # still at the head, joins with the next free slot
        return joiners

    def _pays_to_join(self, ticket: _Ticket, take: int, joiners: list[tuple[_Ticket, int]]) -> bool:
        """ "efficient" admission: join now only if the wait it saves the joiner pays for the slower
        iterations it costs everyone it shares them with.

        With n images running, joining now instead of at the next departure saves the joiner
        `d * c(n)` (d: iterations until the first running image finishes) and costs each member
        `c(n + k) - c(n)` for every iteration it shares with the k joining images. Where a step of
        n images costs about n times one image's (SDXL, FLUX on a GPU; this CPU) early joining buys
        little and slows everyone; where batching is nearly free it always pays. Unknown costs
        (no iteration of that size yet) admit, which is how they get measured. Never applied with
        a backlog (more requests waiting than free slots): then capacity matters more than order,
        and the slots fill at once (tests/bench/des_model.py: deferring under load costs capacity).
        """
        # Iterations left per running image; a joiner's are taken as its steps (a multi-evaluation
        # sampler's are about twice that, unknown until its scheduler exists: an estimate suffices).
        lefts = [len(s.timesteps) - s.i for s in self._running]
        lefts += [t.total_steps for t, _ in joiners]
        if not lefts:
            return True
        n = len(self._running) + sum(k for _, k in joiners)
        now_cost, joined_cost = self._iteration_cost(n), self._iteration_cost(n + take)
        if now_cost is None or joined_cost is None:
            return True
        saved = min(lefts) * now_cost
        slower = (joined_cost - now_cost) * sum(min(left, ticket.total_steps) for left in lefts)
        return saved >= slower

    def _under_cap(self, take: int, joiners: list[tuple[_Ticket, int]]) -> bool:
        """ "capped" admission: may `take` more images join the running ones (and `joiners`)?

        Yes while the batch stays within the cap: the smallest measured batch size whose images per
        second (n / c(n)) are within a slack of the best measured size's. Where a step of n images
        costs about n times one image's (SDXL, FLUX on a GPU) that is 1-3 images, and the engine runs
        the oldest requests nearly one after another instead of sharing the device among all of them:
        the same throughput, but each finishes sooner (sharing delays everyone to the end). Where
        batching is cheap the cap is the max batch and nothing changes. The slack is
        CAP_THROUGHPUT_SLACK while at most a full batch of images waits and shrinks in proportion as
        more do (16 waiting for a max batch of 8: 1%): the deeper the queue, the less capacity the cap
        may give up, so it grows toward the most efficient size. A batch size never measured yet joins
        (that is how it gets measured).
        """
        n = len(self._running) + sum(k for _, k in joiners)
        if n == 0:
            return True
        if self._iteration_cost(n + take) is None:
            return True
        waiting = sum(len(t.request.seeds) - t.next_sample for _, t in self._waiting)
        return n + take <= self._cap(
            CAP_THROUGHPUT_SLACK * self.max_batch_size / max(waiting, self.max_batch_size)
        )

    def _cap(self, slack: float = CAP_THROUGHPUT_SLACK) -> int:
        """The smallest batch size within `slack` of the best measured images per second."""
        rates: dict[int, float] = {}
        for size in range(1, self.max_batch_size + 1):
            seconds = self._iteration_cost(size)
            if seconds is not None and seconds > 0:
                rates[size] = size / seconds
        if not rates:
            return self.max_batch_size
        best = max(rates.values())
        return min(size for size, rate in rates.items() if rate >= (1 - slack) * best)

    def _positions_changed(self) -> list[tuple[_Ticket, int]]:
        """Waiting requests whose place in the queue moved (someone ahead joined); holds the lock."""
        moved = []
        for position, (_, ticket) in enumerate(sorted(self._waiting, key=lambda kt: kt[0])):
            if ticket.next_sample == 0 and ticket.last_position != position:
                ticket.last_position = position
                moved.append((ticket, position))
        return moved

    def _admit(self, ticket: _Ticket, count: int) -> None:
        try:
            if ticket.prompt is None:
                ticket.started = time.monotonic()
                ticket.prompt = self.denoiser.encode(ticket.request, self._embed_text)
            for _ in range(count):
                index = ticket.next_sample
                ticket.next_sample += 1
                sample = self._prepare_sample(ticket, index, ticket.prompt)
                ticket.samples.append(sample)
                self._running.append(sample)
            if ticket.next_sample == count:
                ticket.emit({"event": "started", "batch_size": len(self._running)})
        except Exception:
            # Only this request: its prompt, image or mask is what failed (encoding runs per request).
            log.exception("continuous: preparing a request failed; failing it alone")
            self._remove_ticket(ticket)
            _set_exception(ticket.future, GenerationFailed(MODEL_FAILED))

    def _remove_ticket(self, ticket: _Ticket) -> None:
        ticket.cancelled.set()
        self._running = [s for s in self._running if s.ticket is not ticket]
        for s in ticket.samples:
            self._drop_cache(s)
        with self._cond:
            self._waiting = [(k, t) for k, t in self._waiting if t is not ticket]
            heapq.heapify(self._waiting)

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        for ticket in {id(s.ticket): s.ticket for s in self._running}.values():
            if ticket.future.done() and not ticket.cancelled.is_set():
                ticket.cancelled.set()  # the awaiting side gave up
            deadline = ticket.request.deadline
            if deadline is not None and now > deadline and not ticket.cancelled.is_set():
                ticket.cancelled.set()
                _set_exception(ticket.future, DeadlineExceeded("deadline passed while generating"))
            if ticket.cancelled.is_set():
                self._remove_ticket(ticket)
                _set_exception(ticket.future, RequestCancelled("request cancelled"))

    def _drop_cache(self, sample: _Sample) -> None:
        """A sample that left frees its cached features (the ticket outlives it until decoded)."""
        if sample.cache is not None:
            self.cache_full_steps += sample.cache.full_steps
            self.cache_reused_steps += sample.cache.reused_steps
            sample.cache = None

    def _embed_text(self, text: str) -> tuple[torch.Tensor, ...]:
        cached = self._embed_cache.get(text)
        if cached is not None:
            self._embed_cache.move_to_end(text)
            return cached
        embeds = self.denoiser.encode_text(text)
        self._embed_cache[text] = embeds
        if len(self._embed_cache) > EMBED_CACHE_SIZE:
            self._embed_cache.popitem(last=False)
        return embeds

    def _prepare_sample(self, ticket: _Ticket, index: int, prompt: Prompt) -> _Sample:
        """The family's set-up of a batch of one, in the pipeline's random order."""
        req = ticket.request
        # A CPU generator whatever the device, as the request-level runner: an image depends only on
        # its seed, on any device (diffusers draws on the CPU and moves the noise).
        generator = torch.Generator("cpu").manual_seed(int(req.seeds[index]))
        scheduler = self._make_scheduler(req.scheduler)
        start = self.denoiser.prepare(req, prompt, scheduler, generator)
        return _Sample(
            ticket=ticket,
            index=index,
            scheduler=scheduler,
            generator=generator,
            timesteps=start.timesteps,
            num_steps=start.num_steps,
            warmup=len(start.timesteps) - start.num_steps * scheduler.order,
            latents=start.latents,
            prompt=prompt,
            guidance=req.guidance,
            step_kwargs=self.denoiser.step_kwargs(scheduler, generator),
            blend=start.blend,
            extra=start.extra,
            # The steps the request-level runner hands `step_cache` (so both warm up alike).
            cache=None if req.cache == "off" else SampleCache(req.cache, int(req.steps * req.strength)),
        )

    def _iteration(self) -> None:
        """One denoiser call per image size over the running samples, then each sample steps itself."""
        t0 = time.perf_counter()
        active = self._running[: self._limit]
        # Samples of different sizes (or, for FLUX, text lengths) can't share a denoiser call: one
        # call per group, all in this iteration.
        groups: dict[tuple[Any, ...], list[_Sample]] = {}
        for s in active:
            groups.setdefault(self.denoiser.group_key(s), []).append(s)
        batch = len(active)
        failed = False
        for samples in groups.values():
            failed = self._predict_and_step(samples) or failed
        self.iterations += 1
        if not failed:
            self._ok_iterations += 1
            # Additive increase after an OOM halving: a transient shortage (another process's
            # memory) recovers within a few requests' worth of steps; a persistent one re-halves.
            if self._limit < self.max_batch_size and self._ok_iterations >= 50:
                self._limit += 1
                self._ok_iterations = 0
        still = {id(s) for s in self._running}
        active = [s for s in active if id(s) in still]  # requests that failed have left
        finished = [s for s in active if s.i >= len(s.timesteps)]
        touched: dict[int, _Ticket] = {}
        for s in active:
            t = s.ticket
            if id(t) not in touched:
                touched[id(t)] = t
                t.iterations += 1
                t.max_batch = max(t.max_batch, batch)
        # Progress first: a request's last step is reported before its result can exist.
        for t in touched.values():
            self._report_progress(t)
        if finished:
            self._running = [s for s in self._running if s.i < len(s.timesteps)]
            for s in finished:
                self._drop_cache(s)
            if self._decoder is not None:
                self._decoder.submit(self._decode_on_thread, finished)
            else:
                self._decode(finished)
        seconds = time.perf_counter() - t0
        if not failed:
            old = self._measured_cost.get(batch)
            self._measured_cost[batch] = seconds if old is None else old + COST_SMOOTHING * (seconds - old)
        if self._on_iteration is not None:
            self._on_iteration(batch, seconds)

    def _predict_and_step(self, samples: list[_Sample]) -> bool:
        """One denoiser call over `samples`, then their steps; True if a call failed.

        A failure other than out-of-memory may come from one request's state, so with several
        requests in the call they retry as two halves (recursively) and only a request that fails
        alone fails. A failed call stepped nobody and changed no sample's cache, so retried samples
        are exactly where they were.
        """
        try:
            if any(s.cache is not None for s in samples):
                noise_pred = self.denoiser.predict_cached(samples)
            else:  # nobody caches: the plain call, exactly as without step caching
                noise_pred = self.denoiser.predict(samples)
        except Exception as e:
            tickets = list({id(s.ticket): s.ticket for s in samples}.values())
            if _is_oom(e) or len(tickets) == 1:
                self._on_unet_failure(samples, e)
                return True
            log.warning(
                "continuous: denoiser call over %d requests failed (%s: %s); retrying them as two halves",
                len(tickets),
                type(e).__name__,
                e,
            )
            first = {id(t) for t in tickets[: len(tickets) // 2]}
            self._predict_and_step([s for s in samples if id(s.ticket) in first])
            self._predict_and_step([s for s in samples if id(s.ticket) not in first])
            return True
        self._step(samples, noise_pred)
        return False

    def _on_unet_failure(self, samples: list[_Sample], error: Exception) -> None:
        """Out of memory: halve the running batch and retry; other errors fail these requests only.

        A failed denoiser call stepped nobody, so the samples' states are intact and simply retry.
        """
        tickets = list({id(s.ticket): s.ticket for s in samples}.values())
        if _is_oom(error):
            _empty_cache(self.pipe)
            if len(self._running) > 1 and self._limit > 1:
                self._limit = max(1, min(self._limit, len(self._running)) // 2)
                self._ok_iterations = 0
                log.warning("continuous: out of memory; running at most %d images per step", self._limit)
                return
            log.warning("continuous: out of memory on a single image; failing that request")
            failure: EngineError = OutOfMemory("out of device memory generating this image at this size")
        else:
            log.error("continuous: denoiser call failed", exc_info=error)
            failure = GenerationFailed(MODEL_FAILED)
        for ticket in tickets:
            self._remove_ticket(ticket)
            _set_exception(ticket.future, failure)

    def _step(self, samples: list[_Sample], noise_pred: torch.Tensor) -> None:
        row = 0
        for s in samples:
            rows = s.prompt.rows
            try:
                self._step_one(s, noise_pred[row : row + rows])
            except Exception:  # e.g. a scheduler rejecting its state: fail that request only
                log.exception("continuous: scheduler step failed")
                self._remove_ticket(s.ticket)
                _set_exception(s.ticket.future, GenerationFailed(MODEL_FAILED))
            row += rows

    def _step_one(self, s: _Sample, noise_pred: torch.Tensor) -> None:
        t = s.timesteps[s.i]
        pred = self.denoiser.guide(s, noise_pred)
        s.latents = s.scheduler.step(pred, t, s.latents, **s.step_kwargs, return_dict=False)[0]
        if s.blend is not None:
            blend = s.blend
            proper = blend.image_latents
            if s.i < len(s.timesteps) - 1:
                proper = self.denoiser.renoise(s.scheduler, proper, blend.noise, s.timesteps[s.i + 1])
            s.latents = (1 - blend.mask) * proper + blend.mask * s.latents
        # The pipelines' progress rule: a step is done every `order` evaluations and at the end.
        i = s.i
        if i == len(s.timesteps) - 1 or ((i + 1) > s.warmup and (i + 1) % s.scheduler.order == 0):
            s.steps_done += 1
        s.i += 1

    def _decode_on_thread(self, finished: list[_Sample]) -> None:
        try:
            with torch.inference_mode():
                self._decode(finished)
        except BaseException as e:  # never leave a request hanging on a decoder bug
            log.error("continuous: decoder thread failed", exc_info=e)
            for s in finished:
                self._fail_ticket(s.ticket, GenerationFailed(MODEL_FAILED))

    def _fail_ticket(self, ticket: _Ticket, error: EngineError) -> None:
        """Fail a request from any thread: the worker drops its other samples at the next step."""
        ticket.cancelled.set()
        _set_exception(ticket.future, error)
        with self._cond:
            self._cond.notify_all()

    def _decode(self, finished: list[_Sample]) -> None:
        """VAE-decode finished samples and complete their requests (decoder thread, or worker)."""
        by_size: dict[tuple[int, int], list[_Sample]] = {}
        for s in finished:
            by_size.setdefault(s.size, []).append(s)
        for samples in by_size.values():
            self._decode_group(samples)
        for ticket in {id(s.ticket): s.ticket for s in finished}.values():
            if len(ticket.finished_arrays) == len(ticket.request.seeds) and not ticket.future.done():
                try:
                    self._complete(ticket)
                except Exception:
                    log.exception("continuous: finishing a request's images failed; failing it alone")
                    self._fail_ticket(ticket, GenerationFailed(MODEL_FAILED))

    def _decode_group(self, samples: list[_Sample]) -> None:
        """One VAE call for same-size samples; if it fails, each sample alone, so that only a sample
        that fails by itself (its own latents, or memory at batch 1) fails its request."""
        pipe = self.pipe
        try:
            latents = torch.cat([self.denoiser.vae_input(s) for s in samples])
            arrays = self.denoiser.postprocess(self.denoiser.decode(latents))
        except Exception as e:
            if _is_oom(e):
                _empty_cache(pipe)
            if len(samples) > 1:
                log.warning(
                    "continuous: decoding %d images failed (%s: %s); decoding them one by one",
                    len(samples),
                    type(e).__name__,
                    e,
                )
                for s in samples:
                    self._decode_group([s])
                return
            log.error("continuous: decoding an image failed; failing its request", exc_info=e)
            failure: EngineError = (
                OutOfMemory("out of device memory decoding this image")
                if _is_oom(e)
                else GenerationFailed(MODEL_FAILED)
            )
            self._fail_ticket(samples[0].ticket, failure)
            return
        for s, array in zip(samples, arrays, strict=True):
            s.ticket.finished_arrays[s.index] = array
            self.samples_done += 1

    def _report_progress(self, ticket: _Ticket) -> None:
        if ticket.future.done():
            return
        n = len(ticket.request.seeds)
        done = [s.steps_done for s in ticket.samples] + [0] * (n - len(ticket.samples))
        step = min(done)
        if step > ticket.reported_step:
            ticket.reported_step = step
            ticket.emit({"event": "progress", "step": step, "total": ticket.total_steps})
            if due(step, ticket.total_steps, ticket.request.preview_every):
                self._report_previews(ticket, step)

    def _report_previews(self, ticket: _Ticket, step: int) -> None:
        """A preview of each image of `ticket` (all admitted: `step` is their least); a failure is
        logged and skipped, never the request's."""
        try:
            if self._previewer is None:
                self._previewer = previewer_for(self.pipe.vae)
                log.info("continuous: previews: %s latent-to-RGB projection", self._previewer.source)
            samples = sorted(ticket.samples, key=lambda s: s.index)
            latents = torch.cat([self.denoiser.vae_input(s) for s in samples])
        except Exception:
            log.warning("continuous: making a preview failed; skipping it", exc_info=True)
            return
        pngs = safe_pngs(self._previewer, latents)
        for s, png in zip(samples, pngs or (), strict=False):
            ticket.emit(
                {"event": "preview", "step": step, "total": ticket.total_steps, "index": s.index, "png": png}
            )

    def _complete(self, ticket: _Ticket) -> None:
        now = time.monotonic()
        arrays = [ticket.finished_arrays[i] for i in range(len(ticket.request.seeds))]
        images = self.denoiser.numpy_to_pil(_stack(arrays))
        req = ticket.request
        if req.task == "inpaint":
            # As the request-level runner does: a latent-input denoiser inpaints by blending, which
            # also alters pixels outside the mask (the VAE round trip), so paste the original back
            # where the mask is black ("keep").
            from PIL import Image as PILImage

            images = [
                PILImage.composite(img, req.image.convert(img.mode), req.mask.convert("L")) for img in images
            ]
        started = ticket.started if ticket.started is not None else now
        result = ContinuousResult(
            images=images,
            arrays=arrays,
            seeds=tuple(ticket.request.seeds),
            queue_s=started - ticket.submitted,
            run_s=now - started,
            total_s=now - ticket.submitted,
            batch_size=ticket.max_batch,
            iterations=ticket.iterations,
        )
        self.requests_done += 1
        if ticket.reported_step < ticket.total_steps:
            ticket.reported_step = ticket.total_steps
            ticket.emit({"event": "progress", "step": ticket.total_steps, "total": ticket.total_steps})
        _set_result(ticket.future, result)


def _stack(arrays: list[Any]) -> Any:
    import numpy as np

    return np.stack(arrays)


def _set_result(future: concurrent.futures.Future, value: Any) -> None:
    if not future.done():
        try:
            future.set_result(value)
        except concurrent.futures.InvalidStateError:  # cancelled by the caller meanwhile
            pass


def _set_exception(future: concurrent.futures.Future, error: BaseException) -> None:
    if not future.done():
        try:
            future.set_exception(error)
        except concurrent.futures.InvalidStateError:
            pass


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    # MPS and some CUDA paths raise a plain RuntimeError.
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def _empty_cache(pipe: Any) -> None:
    device = getattr(pipe, "_execution_device", torch.device("cpu"))
    if getattr(device, "type", "cpu") == "cuda":
        torch.cuda.empty_cache()
    elif getattr(device, "type", "cpu") == "mps":
        torch.mps.empty_cache()
