"""Discrete-event model of the request-level and continuous engines, driven by a cost curve.

    python -m tests.bench.des_model                 # the GPU-like curves (~40 s)
    python -m tests.bench.des_model --quick         # fewer simulated requests (seconds)
    python -m tests.bench.des_model --sweep --loads 0.7 0.9   # affine curves a/b = 0..flat, with the
                                                    # lower bound: which shapes reach 0.75x (~8 min)
    python -m tests.bench.continuous_bench --model-only   # the same, plus this CPU's measured curve

Both engines are modelled as the code in `inference_server/` runs them, one device doing one thing
at a time:

- **request-level** (`batcher.py`): a FIFO queue; the oldest request and the later ones with the same
  step count (the batch key) form a batch of up to `max_batch` images. An idle device waits for
  company up to `max_wait` counted from when the oldest arrived or the device became free, whichever
  is later, and only while `adaptive_wait` judges company likely (at least 40% of the last 8 arrival
  gaps shorter than `max_wait`; with fewer than 4 gaps, always). A batch of n images with S steps
  costs `rl_call_fixed(n) + S * (c(n) + rl_step_extra(n))`; every request of it finishes at its end.
- **continuous** (`continuous/core.py`): before every iteration, waiting requests join the free
  slots (oldest first, or by an admission `Policy`), each costing `cont_admit`; an iteration of n
  images costs `c(n) + cont_step_extra(n)`; a sample leaves after its S iterations and is decoded,
  either on a second thread beside the denoising (`decode_parallel`: a second CPU core) or on the
  same device (a GPU), costing `decode(k)` for the k images that finished together (or, with
  `decode_batch` > 1, that were gathered first).

`c(n)` is the cost of one classifier-free-guided UNet step of n images (2n rows). Costs are
`Curve`s: piecewise linear through given points, extended linearly past the last.

Arrivals are open loop (Poisson at a rate, as the load points of the bench) or closed loop (a fixed
number of clients, each sending its next request when the last one returns: saturation
throughput). Loads are fractions of the request-level engine's saturation throughput computed by the
model for the same curve, as the bench does with the measured one. Latency runs from arrival to the
image; admission is arrival to the start of the request's first step (for the request-level engine:
the start of its batch's call).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import random
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from tests.bench.stats import percentile

INF = math.inf
ARRIVAL_HISTORY, MIN_ARRIVAL_HISTORY = 8, 4  # as inference_server/batcher.py


# ---- cost curves ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Curve:
    """Seconds as a function of images n: linear interpolation through `points`, linear beyond."""

    points: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        if len(self.points) < 2 or any(b[0] <= a[0] for a, b in itertools.pairwise(self.points)):
            raise ValueError("a curve needs at least two points with increasing n")

    @classmethod
    def affine(cls, a: float, b: float) -> Curve:
        return cls(((0.0, a), (1.0, a + b)))

    @classmethod
    def zero(cls) -> Curve:
        return cls.affine(0.0, 0.0)

    def __call__(self, n: float) -> float:
        # The segment holding n; the first or last one extended beyond the points.
        segments = list(itertools.pairwise(self.points))
        (x0, y0), (x1, y1) = next((s for s in segments if n <= s[1][0]), segments[-1])
        return y0 + (y1 - y0) * (n - x0) / (x1 - x0)

    def scaled(self, k: float) -> Curve:
        return Curve(tuple((x, y * k) for x, y in self.points))


@dataclass(frozen=True)
class Costs:
    """What the device spends, in seconds, for each kind of work of both engines."""

    name: str
    step: Curve  # c(n): one guided UNet step of n images
    rl_call_fixed: Curve  # request-level, per pipeline call: text encoding, latents, VAE decode, images
    rl_step_extra: Curve = field(default_factory=Curve.zero)  # per step beyond c(n): scheduler, callback
    cont_step_extra: Curve = field(
        default_factory=Curve.zero
    )  # per iteration beyond c(n): per-image schedulers
    decode: Curve = field(default_factory=Curve.zero)  # continuous: VAE decode of k images finished together
    decode_parallel: bool = False  # continuous decodes beside the denoising (a second CPU core)
    cont_admit: float = 0.0  # continuous, per joining image: its latents and scheduler

    def rl_call(self, n: int, steps: int) -> float:
        return self.rl_call_fixed(n) + steps * (self.step(n) + self.rl_step_extra(n))

    def iteration(self, n: int) -> float:
        return self.step(n) + self.cont_step_extra(n)


def gpu_like(
    name: str, step_1: float, per_image_speedup: dict[int, float], decode_steps: float = 1.0
) -> Costs:
    """A GPU-like curve from published batch-n vs batch-1 throughput (images/s ratios).

    c(n) = n / speedup(n) * c(1), linear between the published batch sizes. Decoding costs
    `decode_steps` batch-1 UNet steps per image, linear in the images (a VAE decoder at these sizes
    is compute-bound even for one image) and runs on the same device as the denoising; the
    request-level call pays it once per batch. Text encoding and scheduler steps are taken as free.
    """
    points = [(1.0, step_1)] + [(float(n), n / s * step_1) for n, s in sorted(per_image_speedup.items())]
    decode = Curve.affine(0.0, decode_steps * step_1)
    return Costs(name=name, step=Curve(tuple(points)), rl_call_fixed=decode, decode=decode)


def affine_gpu(ratio: float, step_1: float = 0.1, name: str | None = None) -> Costs:
    """c(n) = a + b n with a / b = `ratio` and c(1) = `step_1`; decode and the rest as `gpu_like`.

    The shape is all that matters to the ratios the model reports (every cost scales with step_1).
    a / b is what a batch buys: batch n over batch 1 gives n (a + b) / (a + n b) the images/s, so
    ratio 0 is a step proportional to the images (batching buys nothing), ratio -> infinity a flat
    step (batch 8 = 8x). Fitted to the published figures: SD 1.5 on an A100 (batch 16 = 2.25x) 1.45,
    SDXL on an A100 (batch 16 = 1.19x) 0.2, a FLUX-class DiT at 1024 px (batch 2 = 1.02x) 0.04.
    """
    b = step_1 / (1 + ratio)
    a = ratio * b
    decode = Curve.affine(0.0, step_1)
    return Costs(
        name=name or f"affine, a/b = {ratio:g}",
        step=Curve.affine(a, b),
        rl_call_fixed=decode,
        decode=decode,
    )


def ratio_for_speedup(n: int, speedup: float) -> float:
    """The a / b of an affine curve whose batch of n gives `speedup` x the images/s of batch 1."""
    # n (a + b) / (a + n b) = s  =>  a (n - s) = b n (s - 1)
    return n * (speedup - 1) / (n - speedup)


# Published figures (docs/benchmarks.md and /work/shared/notes/serving.md cite their sources):
# SD 1.5 512x512 on an A100, fp16, SDPA: batch 4 = 2.14x and batch 16 = 2.25x the images/s of batch 1,
# about 1.59 s per 50-step image at batch 1 (so ~30 ms per guided step). SDXL 1024x1024 on an A100:
# batch 16 = 1.19x, about 5.93 s per 50-step image (~115 ms per step).
SD15_A100 = gpu_like("SD 1.5 A100 (published)", 0.030, {4: 2.14, 16: 2.25})
SDXL_A100 = gpu_like("SDXL A100 (published)", 0.115, {16: 1.19})
# FLUX-class transformers at 1024x1024: the one published batching figure for a DiT of that class is
# Qwen-Image on an H200, batch 2 = 1.02x the images/s of batch 1 (serving.md); the curve goes
# through it and on linearly (each further image ~0.96x a lone step). The per-step time (0.2 s, about
# FLUX.1-dev's at 1024x1024 on a recent GPU) is assumed; the model's ratios don't depend on it, since
# every cost here scales with it.
FLUX_LIKE = gpu_like("FLUX-class DiT (Qwen-Image H200 published)", 0.200, {2: 1.02})
# The limit case: a step costs the same for 1 to 8 images, then grows linearly.
FLAT_TO_8 = gpu_like("flat to 8 (ideal)", 0.030, {8: 8.0, 16: 8.0})
GPU_CURVES = (SD15_A100, SDXL_A100, FLUX_LIKE, FLAT_TO_8)


# ---- arrivals -------------------------------------------------------------------------------------


@dataclass
class Request:
    index: int
    arrival: float
    steps: int
    start: float = -1.0  # start of its first step (admission)
    done: float = -1.0  # its image exists


class Arrivals:
    """Open loop: a fixed schedule of (time, steps)."""

    def __init__(self, schedule: Sequence[tuple[float, int]]):
        self.requests = [Request(i, t, s) for i, (t, s) in enumerate(schedule)]
        self._next = 0

    def peek(self) -> float:
        return self.requests[self._next].arrival if self._next < len(self.requests) else INF

    def pop(self) -> Request:
        r = self.requests[self._next]
        self._next += 1
        return r

    def completed(self, request: Request) -> None:
        pass


class ClosedLoop(Arrivals):
    """`clients` clients; each sends its next request the moment its last one returns.

    Client i sends its first request at `i * stagger`: started all at once, the continuous engine's
    requests would join, run and leave in lockstep, as request-level batches do, and the figure
    would hide what staggered departures cost it (one decode per departure instead of per batch).
    """

    def __init__(
        self,
        clients: int,
        total: int,
        steps: Callable[[random.Random], int],
        stagger: float = 0.0,
        seed: int = 0,
    ):
        self.requests = []
        self._heap: list[tuple[float, int]] = []
        self._total, self._steps, self._rng = total, steps, random.Random(seed)
        for i in range(min(clients, total)):
            self._issue(i * stagger)

    def _issue(self, at: float) -> None:
        r = Request(len(self.requests), at, self._steps(self._rng))
        self.requests.append(r)
        heapq.heappush(self._heap, (at, r.index))

    def peek(self) -> float:
        return self._heap[0][0] if self._heap else INF

    def pop(self) -> Request:
        return self.requests[heapq.heappop(self._heap)[1]]

    def completed(self, request: Request) -> None:
        if len(self.requests) < self._total:
            self._issue(request.done)


def poisson(rate: float, n: int, steps: Callable[[random.Random], int], seed: int) -> list[tuple[float, int]]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append((t, steps(rng)))
        t += rng.expovariate(rate)
    return out


def workload(name: str) -> Callable[[random.Random], int]:
    """ "20": every request 20 steps; "mixed": 10 or 20 steps, half each (the bench's workloads)."""
    if name == "20":
        return lambda rng: 20
    if name == "mixed":
        return lambda rng: rng.choice((10, 20))
    raise ValueError(f"unknown workload {name!r}")


# ---- the engines ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 8
    max_wait_s: float = 0.050  # request-level
    adaptive_wait: bool = True  # request-level
    # Continuous: decode finished images once this many are pending, or the oldest has waited
    # `decode_wait_s`, or nothing else runs. 1: every iteration's finished images at once (the
    # engine today).
    decode_batch: int = 1
    decode_wait_s: float = 0.1


def simulate_request_level(source: Arrivals, costs: Costs, cfg: EngineConfig) -> list[Request]:
    queue: list[Request] = []
    gaps: deque[float] = deque(maxlen=ARRIVAL_HISTORY)
    last_arrival: float | None = None
    now = device_free_at = 0.0
    while True:
        while source.peek() <= now:
            r = source.pop()
            if last_arrival is not None:
                gaps.append(r.arrival - last_arrival)
            last_arrival = r.arrival
            queue.append(r)
        if not queue:
            if source.peek() == INF:
                return source.requests
            now = source.peek()
            continue
        head = queue[0]
        batch = [r for r in queue if r.steps == head.steps][: cfg.max_batch]
        wait_left = max(head.arrival, device_free_at) + cfg.max_wait_s - now
        if len(batch) < cfg.max_batch and wait_left > 1e-12 and _companions_likely(gaps, cfg):
            now = min(source.peek(), now + wait_left)  # woken by an arrival, or the wait ran out
            continue
        chosen = {r.index for r in batch}
        queue = [r for r in queue if r.index not in chosen]
        start, now = now, now + costs.rl_call(len(batch), head.steps)
        device_free_at = now
        for r in batch:
            r.start, r.done = start, now
            source.completed(r)


def _companions_likely(gaps: deque[float], cfg: EngineConfig) -> bool:
    if not cfg.adaptive_wait or len(gaps) < MIN_ARRIVAL_HISTORY:
        return True
    ordered = sorted(gaps)
    return ordered[int(0.4 * (len(ordered) - 1))] <= cfg.max_wait_s


@dataclass
class Running:
    request: Request
    left: int  # iterations to go


class Policy:
    """Which waiting requests join the running batch before an iteration (the engine: oldest first)."""

    def pick(
        self, now: float, waiting: list[Request], running: list[Running], free: int, costs: Costs
    ) -> list[Request]:
        return waiting[:free]


class ShortestFirst(Policy):
    """Waiting requests with the fewest steps join first (ties: the oldest)."""

    def pick(
        self, now: float, waiting: list[Request], running: list[Running], free: int, costs: Costs
    ) -> list[Request]:
        return sorted(waiting, key=lambda r: (r.steps, r.arrival))[:free]


class PaysForItself(Policy):
    """The issue's rule: a joiner joins only when the waiting it saves pays for the slower steps.

    Taken literally: joining now saves the joiner the wait until the next member leaves
    (d iterations at the current cost), and costs every member `c(n + 1) - c(n)` for each iteration
    it shares with the joiner. Join when saved >= that cost summed over the members. (Counting only
    the slow-down a deferral would really avoid, the members' iterations before the next departure,
    the rule admits always when c is affine: the joiner gains a whole iteration, a + b n, for b n.)
    """

    def pick(
        self, now: float, waiting: list[Request], running: list[Running], free: int, costs: Costs
    ) -> list[Request]:
        joiners: list[Request] = []
        for r in waiting[:free]:
            n = len(running) + len(joiners)
            if n == 0:
                joiners.append(r)
                continue
            lefts = [m.left for m in running] + [j.steps for j in joiners]
            saved = min(lefts) * costs.iteration(n)
            slower = (costs.iteration(n + 1) - costs.iteration(n)) * sum(min(x, r.steps) for x in lefts)
            if saved < slower:
                break  # FIFO: nobody overtakes a deferred older request
            joiners.append(r)
        return joiners


class PaysUnlessBacklog(PaysForItself):
    """The rule above only while every waiting request fits the free slots; with a backlog (more
    waiting than free slots) everyone joins at once, so the rule never leaves capacity unused
    while work queues."""

    def pick(
        self, now: float, waiting: list[Request], running: list[Running], free: int, costs: Costs
    ) -> list[Request]:
        if len(waiting) > free:
            return waiting[:free]
        return super().pick(now, waiting, running, free, costs)


class Capped(Policy):
    """The engine's `admission = "capped"` (continuous/core.py): FIFO, and the running batch grows
    only up to the smallest size whose images/s (n / iter(n)) are within a slack of the best size's:
    `slack` while at most `max_batch` requests wait, shrinking in proportion as more do (the deeper
    the queue, the less capacity the cap may give up). The model knows the curve; the engine
    measures it (a size never measured yet joins)."""

    def __init__(self, max_batch: int = 8, slack: float = 0.02):
        self.max_batch, self.slack = max_batch, slack

    def cap(self, costs: Costs, waiting: int = 0) -> int:
        slack = self.slack * self.max_batch / max(waiting, self.max_batch)
        rates = {n: n / costs.iteration(n) for n in range(1, self.max_batch + 1)}
        best = max(rates.values())
        return min(n for n, r in rates.items() if r >= (1 - slack) * best)

    def pick(
        self, now: float, waiting: list[Request], running: list[Running], free: int, costs: Costs
    ) -> list[Request]:
        return waiting[: max(0, min(free, self.cap(costs, len(waiting)) - len(running)))]


class FixedCap(Policy):
    """FIFO, at most `k` images running (a max batch of k for the continuous engine alone)."""

    def __init__(self, k: int):
        self.k = k

    def pick(
        self, now: float, waiting: list[Request], running: list[Running], free: int, costs: Costs
    ) -> list[Request]:
        return waiting[: max(0, min(free, self.k - len(running)))]


class Cohorts(Policy):
    """Join only in groups: when `size` are waiting (or all free slots can be filled), or the oldest
    has waited `wait_s`, or nothing runs (request-level batching's rule, at step granularity)."""

    def __init__(self, size: int, wait_s: float):
        self.size, self.wait_s = size, wait_s

    def pick(
        self, now: float, waiting: list[Request], running: list[Running], free: int, costs: Costs
    ) -> list[Request]:
        if not running or len(waiting) >= min(self.size, free) or now - waiting[0].arrival >= self.wait_s:
            return waiting[:free]
        return []


def simulate_continuous(
    source: Arrivals, costs: Costs, cfg: EngineConfig, policy: Policy | None = None
) -> list[Request]:
    policy = policy or Policy()
    waiting: list[Request] = []
    running: list[Running] = []
    pending: list[tuple[float, Request]] = []  # finished denoising, not yet decoded
    now = decoder_free = 0.0
    while True:
        while source.peek() <= now:
            waiting.append(source.pop())
        if not waiting and not running:
            if source.peek() == INF:
                return source.requests
            now = source.peek()
            continue
        free = cfg.max_batch - len(running)
        joiners = policy.pick(now, waiting, running, free, costs) if waiting and free > 0 else []
        if joiners:
            picked = {r.index for r in joiners}
            waiting = [r for r in waiting if r.index not in picked]
            for r in joiners:
                r.start = now
                running.append(Running(r, r.steps))
            now += costs.cont_admit * len(joiners)
        if not running:  # a policy held everyone back with the device idle: wait for the next arrival
            now = min(source.peek(), now + 0.001)
            continue
        now += costs.iteration(len(running))
        for m in running:
            m.left -= 1
        pending += [(now, m.request) for m in running if m.left == 0]
        running = [m for m in running if m.left > 0]
        if pending and (
            len(pending) >= cfg.decode_batch or not running or now - pending[0][0] >= cfg.decode_wait_s
        ):
            if costs.decode_parallel:
                decoder_free = max(now, decoder_free) + costs.decode(len(pending))
                done = decoder_free
            else:
                now += costs.decode(len(pending))
                done = now
            for _, r in pending:
                r.done = done
                source.completed(r)
            pending = []


def fifo_lower_bound(schedule: Sequence[tuple[float, int]], costs: Costs, cfg: EngineConfig) -> list[float]:
    """Per request, a latency no engine on `costs` can beat while finishing requests in arrival order.

    Both engines finish equal-step requests in arrival order. Relax the device: let every image cost
    what it costs in a full batch, `iter(N) / N` per step (N = max batch; iter(n) / n only falls
    with n on these curves), at any batch size, with free admissions. Any schedule on the real device
    runs on the relaxed one with no event later, and with equal work per request, serving them one at
    a time in arrival order finishes the k-th as early as any schedule can: its latency is a lower
    bound for the k-th request. So is the latency of the request alone on the real device:
    S x iter(1) + decode(1). The bound is the larger of the two. (With unequal steps an engine may
    reorder and the first part is only the best FIFO engine's, not a bound.)
    """
    per_step = costs.iteration(cfg.max_batch) / cfg.max_batch
    # Decoding on the same device is device work; beside it (a second core), only latency.
    on_device = 0.0 if costs.decode_parallel else costs.decode(1)
    free_at, out = 0.0, []
    for arrival, steps in schedule:
        free_at = max(free_at, arrival) + steps * per_step + on_device
        done = free_at + costs.decode(1) - on_device
        floor = steps * costs.iteration(1) + costs.decode(1)
        out.append(max(done - arrival, floor))
    return out


def bound_p95(
    schedule: Sequence[tuple[float, int]], costs: Costs, cfg: EngineConfig, warmup: float = 0.1
) -> float:
    """p95 of `fifo_lower_bound` over the same steady part as `figures`."""
    return percentile(fifo_lower_bound(schedule, costs, cfg)[int(warmup * len(schedule)) :], 95)


# ---- measurements on the model --------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    p50: float
    p95: float
    p99: float
    admission_p95: float
    throughput: float


def figures(requests: list[Request], warmup: float = 0.1) -> Figures:
    """Latency percentiles over the requests after the first `warmup` fraction (the model starts
    empty; a real server under steady load does not); throughput over the steady part."""
    steady = sorted(requests, key=lambda r: r.arrival)[int(warmup * len(requests)) :]
    lat = [r.done - r.arrival for r in steady]
    adm = [r.start - r.arrival for r in steady]
    span = max(r.done for r in steady) - min(r.arrival for r in steady)
    return Figures(
        percentile(lat, 50), percentile(lat, 95), percentile(lat, 99), percentile(adm, 95), len(steady) / span
    )


def saturation(
    engine: str, costs: Costs, cfg: EngineConfig, load: str, total: int = 4000, policy: Policy | None = None
) -> float:
    """Closed-loop throughput with 2 x max_batch clients (requests/s), past the ramp-up and -down;
    the clients start a quarter of one lone 20-step request's time apart, as in the bench."""
    clients = 2 * cfg.max_batch
    source = ClosedLoop(clients, total, workload(load), stagger=costs.rl_call(1, 20) / 4)
    done = run(engine, source, costs, cfg, policy)
    return steady_rate(sorted(r.done for r in done), clients)


def steady_rate(done_times: Sequence[float], clients: int) -> float:
    """Completions per second between the `clients`-th completion and the `clients`-th from last:
    the closed loop's ramp-up and ramp-down are left out."""
    n = len(done_times)
    if n <= 2 * clients:
        raise ValueError(f"{n} completions: too few for {clients} clients")
    return (n - 2 * clients) / (done_times[n - clients - 1] - done_times[clients - 1])


def run(
    engine: str, source: Arrivals, costs: Costs, cfg: EngineConfig, policy: Policy | None = None
) -> list[Request]:
    if engine == "request-level":
        return simulate_request_level(source, costs, cfg)
    if engine == "continuous":
        return simulate_continuous(source, costs, cfg, policy)
    raise ValueError(f"unknown engine {engine!r}")


def open_loop(
    engine: str,
    costs: Costs,
    cfg: EngineConfig,
    load: str,
    rate: float,
    n: int,
    seed: int = 1,
    policy: Policy | None = None,
) -> Figures:
    return figures(run(engine, Arrivals(poisson(rate, n, workload(load), seed)), costs, cfg, policy))


# ---- the report -----------------------------------------------------------------------------------

GOAL_RATIO = 0.75  # issue 17: continuous p95 <= 0.75x request-level at 70% and 90%, GPU-like curve
GOAL_LOADS = (0.7, 0.9)


def compare(
    costs: Costs,
    cfg: EngineConfig,
    loads: Sequence[float],
    workloads: Sequence[str],
    n: int,
    policy: Policy | None = None,
) -> list[dict]:
    """Both engines at fractions of the request-level saturation, per workload."""
    rows = []
    for load_name in workloads:
        sat_rl = saturation("request-level", costs, cfg, load_name)
        sat_c = saturation("continuous", costs, cfg, load_name, policy=policy)
        for load in loads:
            rate = load * sat_rl
            rl = open_loop("request-level", costs, cfg, load_name, rate, n)
            cont = open_loop("continuous", costs, cfg, load_name, rate, n, policy=policy)
            rows.append(
                dict(workload=load_name, load=load, rate=rate, sat_rl=sat_rl, sat_c=sat_c, rl=rl, cont=cont)
            )
    return rows


def label(load_name: str) -> str:
    return "all 20 steps" if load_name == "20" else "mixed 10/20 steps"


def comparison_table(costs: Costs, rows: list[dict]) -> list[str]:
    lines = [
        "| curve | workload | load (req/s) | saturation req/s: request-level / continuous | "
        "p95 s: request-level / continuous | continuous / request-level p95 | "
        "admission p95 s: request-level / continuous |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {costs.name} | {label(r['workload'])} | {r['load']:.0%} ({r['rate']:.2f}) | "
            f"{r['sat_rl']:.2f} / {r['sat_c']:.2f} ({r['sat_c'] / r['sat_rl']:.3f}x) | "
            f"{r['rl'].p95:.3f} / {r['cont'].p95:.3f} | **{r['cont'].p95 / r['rl'].p95:.2f}x** | "
            f"{r['rl'].admission_p95:.3f} / {r['cont'].admission_p95:.3f} |"
        )
    return lines


def verdicts(costs: Costs, rows: list[dict], goal: float) -> list[str]:
    out = []
    for r in rows:
        if any(abs(r["load"] - g) < 1e-9 for g in GOAL_LOADS):
            ratio = r["cont"].p95 / r["rl"].p95
            out.append(
                f"model, {costs.name}, {label(r['workload'])}, {r['load']:.0%}: continuous p95 {ratio:.2f}x "
                f"request-level (goal <= {goal:.2f}x): {'met' if ratio <= goal else 'NOT met'}"
            )
    return out


@dataclass(frozen=True)
class Variant:
    """A way to run the continuous engine: an admission policy and decode batching."""

    name: str
    policy: Policy
    decode_batch: int = 1

    def config(self, cfg: EngineConfig) -> EngineConfig:
        return replace(cfg, decode_batch=self.decode_batch)


VARIANTS: tuple[Variant, ...] = (
    Variant("greedy (the engine today)", Policy()),
    Variant("fewest steps first", ShortestFirst()),
    Variant("pays for itself", PaysForItself()),
    # The rule the engine runs with `[batching] admission = "efficient"` (continuous/core.py).
    Variant('pays for itself unless a backlog ("efficient")', PaysUnlessBacklog()),
    # The rule the engine runs with `[batching] admission = "capped"` (continuous/core.py).
    Variant('capped at 98% of the best images/s ("capped")', Capped()),
    Variant("cohorts of 4 or 50 ms", Cohorts(4, 0.05)),
    Variant("greedy, decode 4 at a time (or 100 ms)", Policy(), decode_batch=4),
)


def policy_table(
    curves: Sequence[Costs], cfg: EngineConfig, loads: Sequence[float], workloads: Sequence[str], n: int
) -> list[str]:
    """Every variant's continuous p95 over the request-level engine's (same arrivals), and its
    closed-loop saturation over the request-level engine's."""
    lines = [
        "| curve | workload | load | " + " | ".join(v.name for v in VARIANTS) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in VARIANTS) + " |",
    ]
    for costs in curves:
        for load_name in workloads:
            sat_rl = saturation("request-level", costs, cfg, load_name)
            cells = [
                f"{saturation('continuous', costs, v.config(cfg), load_name, policy=v.policy) / sat_rl:.2f}x"
                for v in VARIANTS
            ]
            lines.append(f"| {costs.name} | {label(load_name)} | saturation | " + " | ".join(cells) + " |")
            for load in loads:
                rate = load * sat_rl
                rl = open_loop("request-level", costs, cfg, load_name, rate, n)
                cells = [
                    f"{open_loop('continuous', costs, v.config(cfg), load_name, rate, n, policy=v.policy).p95 / rl.p95:.2f}x"
                    for v in VARIANTS
                ]
                lines.append(
                    f"| {costs.name} | {label(load_name)} | {load:.0%} | " + " | ".join(cells) + " |"
                )
    return lines


SWEEP_RATIOS = (0.0, 0.04, 0.2, 0.5, 1.0, 1.4, 2.0, 4.0, 8.0, 16.0, 1000.0)
SWEEP_CAPS = (1, 2, 3, 4, 6)
SWEEP_HEADER = (
    "| a/b | batch 8 vs 1 (images/s) | load | always | efficient | capped | best fixed cap | "
    "lower bound (any FIFO engine) |",
    "| --- | --- | --- | --- | --- | --- | --- | --- |",
)


def sweep_table(
    cfg: EngineConfig,
    ratios: Sequence[float] = SWEEP_RATIOS,
    loads: Sequence[float] = GOAL_LOADS,
    n: int = 6000,
    seeds: Sequence[int] = (1, 2, 3),
    on_line: Callable[[str], None] | None = None,
) -> list[str]:
    """For affine curves c(n) = a + b n of each a / b, all requests 20 steps: continuous p95 over
    request-level p95 at each load with the engine's rules, the best fixed cap on the running batch
    (chosen per point, with hindsight) and the lower bound (`fifo_lower_bound`). Each cell is the
    median over `seeds` (independent arrival sequences) with the range in brackets."""
    policies: list[tuple[str, Policy]] = [
        ("always", Policy()),
        ("efficient", PaysUnlessBacklog()),
        ("capped", Capped(cfg.max_batch)),
    ]
    caps = [(f"cap {k}", FixedCap(k)) for k in SWEEP_CAPS]
    lines = list(SWEEP_HEADER)
    for ratio in ratios:
        costs = affine_gpu(ratio)
        speedup = cfg.max_batch * costs.iteration(1) / costs.iteration(cfg.max_batch)
        sat = saturation("request-level", costs, cfg, "20")
        for load in loads:
            cells: dict[str, list[float]] = {}
            best_caps: list[str] = []
            for seed in seeds:
                schedule = poisson(load * sat, n, workload("20"), seed)
                rl = figures(run("request-level", Arrivals(schedule), costs, cfg)).p95
                for name, policy in policies:
                    p95 = figures(run("continuous", Arrivals(schedule), costs, cfg, policy)).p95
                    cells.setdefault(name, []).append(p95 / rl)
                by_cap = {
                    name: figures(run("continuous", Arrivals(schedule), costs, cfg, policy)).p95 / rl
                    for name, policy in caps
                }
                best = min(by_cap, key=lambda k: by_cap[k])
                best_caps.append(best.removeprefix("cap "))
                cells.setdefault("cap", []).append(by_cap[best])
                cells.setdefault("bound", []).append(bound_p95(schedule, costs, cfg) / rl)

            def cell(xs: list[float]) -> str:
                return f"{statistics.median(xs):.2f}x ({min(xs):.2f}-{max(xs):.2f})"

            lines.append(
                f"| {'flat' if ratio >= 1000 else f'{ratio:g}'} | {speedup:.2f}x | {load:.0%} | "
                + " | ".join(cell(cells[k]) for k in ("always", "efficient", "capped"))
                + f" | {cell(cells['cap'])} (k = {', '.join(best_caps)}) | {cell(cells['bound'])} |"
            )
            if on_line is not None:
                on_line(lines[-1])
    return lines


def bound_table(
    curves: Sequence[Costs], cfg: EngineConfig, loads: Sequence[float], workloads: Sequence[str], n: int
) -> list[str]:
    """The lower bound over request-level p95 for each curve and load (same arrivals as `compare`)."""
    lines = [
        "| curve | workload | load | lower bound / request-level p95 |",
        "| --- | --- | --- | --- |",
    ]
    for costs in curves:
        for load_name in workloads:
            sat_rl = saturation("request-level", costs, cfg, load_name)
            for load in loads:
                schedule = poisson(load * sat_rl, n, workload(load_name), 1)
                rl = figures(run("request-level", Arrivals(schedule), costs, cfg)).p95
                note = "" if load_name == "20" else " (best FIFO engine, not a bound)"
                lines.append(
                    f"| {costs.name} | {label(load_name)} | {load:.0%} | "
                    f"{bound_p95(schedule, costs, cfg) / rl:.2f}x{note} |"
                )
    return lines


def describe(costs: Costs, cfg: EngineConfig) -> str:
    sizes = sorted({1, 2, 4, cfg.max_batch})

    def ms(f: Callable[[int], float]) -> str:
        return " / ".join(f"{f(n) * 1000:.1f}" for n in sizes)

    return (
        f"{costs.name}, for n = {' / '.join(map(str, sizes))} images: UNet step c(n) {ms(costs.step)} ms; "
        f"continuous iteration {ms(costs.iteration)} ms; request-level step {ms(lambda n: costs.step(n) + costs.rl_step_extra(n))} ms "
        f"+ per call {ms(costs.rl_call_fixed)} ms; decode {ms(costs.decode)} ms "
        f"({'beside the denoising' if costs.decode_parallel else 'on the same device'})"
    )


def report(
    curves: Sequence[Costs],
    cfg: EngineConfig,
    loads: Sequence[float] = (0.5, 0.7, 0.9),
    workloads: Sequence[str] = ("20", "mixed"),
    n: int = 20_000,
    policies: bool = True,
    goal: dict[str, float] | None = None,
) -> list[str]:
    """The model's tables for `curves`: engines compared, verdicts, and (optionally) the policies."""
    started = time.perf_counter()
    lines = [
        f"discrete-event model: max batch {cfg.max_batch}, request-level max wait {cfg.max_wait_s * 1000:.0f} ms "
        f"(adaptive: {cfg.adaptive_wait}); {n} Poisson arrivals per point (first 10% left out), "
        "saturation from 2 x max batch closed-loop clients",
    ]
    lines += [f"- {describe(c, cfg)}" for c in curves]
    lines.append("")
    table: list[str] = []
    verdict_lines: list[str] = []
    for costs in curves:
        rows = compare(costs, cfg, loads, workloads, n)
        body = comparison_table(costs, rows)
        table += body if not table else body[2:]
        verdict_lines += verdicts(costs, rows, (goal or {}).get(costs.name, GOAL_RATIO))
    lines += table + [""] + verdict_lines
    lines += [
        "",
        "lower bound on continuous p95 (fifo_lower_bound: every image at a full batch's cost per image, "
        "one request at a time in arrival order, free admissions; and no faster than alone) over "
        "request-level p95:",
        "",
    ]
    lines += bound_table(curves, cfg, loads, workloads, n)
    if policies:
        lines += [
            "",
            "continuous engine variants: p95 / request-level p95 at each load (same arrivals); saturation / "
            "request-level saturation (closed loop):",
            "",
        ]
        lines += policy_table(curves, cfg, loads, workloads, max(2000, n // 4))
    lines.append(f"\n(model run took {time.perf_counter() - started:.0f} s)")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2000 requests per point instead of 20000")
    parser.add_argument("--loads", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--no-policies", action="store_true", help="skip the admission-policy table")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="only the affine-curve sweep: which a/b reach 0.75x, with the lower bound (~10 min)",
    )
    parser.add_argument("--ratios", type=float, nargs="+", default=list(SWEEP_RATIOS), help="a/b for --sweep")
    args = parser.parse_args(argv)
    cfg = EngineConfig(max_batch=args.max_batch)
    if args.sweep:
        started = time.perf_counter()
        n = 2000 if args.quick else 6000
        print(
            f"affine curves c(n) = a + b n, all requests 20 steps, max batch {cfg.max_batch}; {n} Poisson "
            "arrivals per point, median (range) over 3 arrival sequences; loads are fractions of the "
            "request-level engine's saturation on the same curve\n"
        )
        print("\n".join(SWEEP_HEADER), flush=True)
        sweep_table(cfg, args.ratios, args.loads, n, on_line=lambda line: print(line, flush=True))
        print(f"\n(took {time.perf_counter() - started:.0f} s)")
        return
    curves = GPU_CURVES
    print(
        "\n".join(
            report(curves, cfg, args.loads, n=2000 if args.quick else 20_000, policies=not args.no_policies)
        )
    )


if __name__ == "__main__":
    main()
