"""`make deploy-test`: the fleet of deploy/compose.yaml on this machine, with a server and a bot
killed mid-run, every job delivered once, and images shared between the bots through S3.

    python -m tests.deploy.compose_check [--jobs 24] [--keep] [--skip-build] [--compose-file FILE]

1. Builds the images (deploy/build-images.sh: server, bot, the stand-in S3 server, and PostgreSQL
   when none can be pulled).
2. Starts PostgreSQL and the S3 server, the migrations, two inference servers and two bots (no
   shared folder: their images live in the bucket) with podman-compose, in
   dependency order, each stage when the previous one is healthy (the script runs the compose
   file's healthchecks itself: podman runs them on a systemd timer, and hosts without systemd have
   none).
3. Submits jobs through the public bot's playground HTTP API (Gradio's client, signed in), as a
   few users at once.
4. While jobs run: kills (SIGKILL to the container's main process, as a crash would) the other bot
   while it holds running jobs, then a server; the compose file's restart policy brings them back.
5. Waits for every job and checks: each submission ended in one job that succeeded, with its
   images, shown to its client; each job row is succeeded, delivered (delivered_at set, no lease
   left), with the images it asked for and no more.
6. Shared storage: every image row's object is in the bucket; then, with bot-2 stopped, bot-1 makes
   variations of images bot-2 made (each through the session that made its parent), which it can
   only read from the bucket.
7. Prints PASS or FAIL with the figures, and removes the containers and volumes (--keep leaves
   them up for a look: `podman ps`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.ports import free_port

REPO = Path(__file__).resolve().parents[2]
PROJECT = "imagine-deploytest"
COMPOSE_FILES = [REPO / "deploy" / "compose.yaml", Path(__file__).resolve().parent / "compose.test.yaml"]
# Each stage gets this long to become healthy; a server loads the embedded model in seconds, but
# a busy 2-core machine starting two of them plus two bots can take a minute or two.
STAGE_TIMEOUT_S = 300.0
USERS = ("ada", "bob", "cyd", "dee")
# Variations of bot-2's images made by bot-1 in the storage check: a few show the path; each costs a
# job's run time.
VARIATIONS = 3
BUCKET = "imagine-images"


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


class CheckFailed(Exception):
    pass


@dataclass
class Fleet:
    env: dict[str, str]
    playground_url: str
    password: str
    files: list[Path]

    def compose(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        files = [a for f in self.files for a in ("-f", str(f))]
        podman_compose = shutil.which(
            "podman-compose", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}"
        )
        assert podman_compose, "podman-compose is not installed (pip install '.[dev]')"
        cmd = [podman_compose, "-p", PROJECT, *files, *args]
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=False)
        if check and done.returncode != 0:
            raise CheckFailed(f"{' '.join(cmd[1:])} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        return done

    def podman(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["podman", *args], env=self.env, capture_output=True, text=True, check=False, timeout=timeout
        )
        if check and done.returncode != 0:
            raise CheckFailed(f"podman {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def container(self, service: str) -> str:
        out = self.podman(
            "ps", "-a", "--format", "{{.Names}}",
            "--filter", f"label=io.podman.compose.project={PROJECT}",
            "--filter", f"label=io.podman.compose.service={service}",
        ).stdout.split()  # fmt: skip
        if len(out) != 1:
            raise CheckFailed(f"expected one container of {service}, found {out}")
        return out[0]

    def healthy(self, service: str) -> bool:
        """Runs the service's healthcheck once (podman healthcheck run)."""
        return self.podman("healthcheck", "run", self.container(service), check=False).returncode == 0

    def wait_healthy(self, *services: str) -> None:
        deadline = time.monotonic() + STAGE_TIMEOUT_S
        pending = list(services)
        while pending:
            pending = [s for s in pending if not self.healthy(s)]
            if not pending:
                break
            if time.monotonic() > deadline:
                for s in pending:
                    tail = self.podman("logs", "--tail", "30", self.container(s), check=False)
                    log(f"{s} logs:\n{tail.stdout}{tail.stderr}")
                raise CheckFailed(f"not healthy after {STAGE_TIMEOUT_S:.0f} s: {', '.join(pending)}")
            time.sleep(2)
        log(f"healthy: {', '.join(services)}")

    def crash(self, service: str) -> None:
        """SIGKILL to the container's main process from outside: a crash, not `podman stop`/`kill`,
        which count as stopped by the user and are not restarted."""
        pid = int(self.podman("inspect", "--format", "{{.State.Pid}}", self.container(service)).stdout)
        os.kill(pid, signal.SIGKILL)

    def hostname(self, service: str) -> str:
        return self.podman(
            "inspect", "--format", "{{.Config.Hostname}}", self.container(service)
        ).stdout.strip()

    def sql(self, query: str) -> list[list[str]]:
        out = self.podman(
            "exec", self.container("postgres"), "psql", "-U", "imagine", "-d", "imagine", "-At", "-F", "\t", "-c", query
        ).stdout  # fmt: skip
        return [line.split("\t") for line in out.splitlines() if line]


def build_images(skip: bool) -> dict[str, str]:
    if skip:
        return images_built_before()
    log("building the images (deploy/build-images.sh)")
    started = time.monotonic()
    done = subprocess.run(
        ["sh", str(REPO / "deploy" / "build-images.sh")], cwd=REPO, stdout=subprocess.PIPE, text=True, check=False,
        env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    if done.returncode != 0:
        raise CheckFailed("building the images failed (see above)")
    log(f"images built in {time.monotonic() - started:.0f} s")
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if re.fullmatch(r"[A-Z_]+=\S+", line))


def images_built_before() -> dict[str, str]:
    """What deploy/build-images.sh would print, for images it built on an earlier run."""

    def exists(image: str) -> bool:
        return subprocess.run(["podman", "image", "exists", image], check=False).returncode == 0

    images = {
        "SERVER_IMAGE": os.environ.get("SERVER_IMAGE", "localhost/imagine-server:latest"),
        "BOT_IMAGE": os.environ.get("BOT_IMAGE", "localhost/imagine-bot:latest"),
        "POSTGRES_IMAGE": os.environ.get("POSTGRES_IMAGE")
        or (
            "localhost/imagine-postgres:15"
            if exists("localhost/imagine-postgres:15")
            else "docker.io/library/postgres:16"
        ),
        "S3_IMAGE": os.environ.get("S3_IMAGE", "localhost/imagine-s3:latest"),
    }
    missing = [image for image in images.values() if not exists(image)]
    if missing:
        raise CheckFailed(
            f"--skip-build, but these images are missing: {', '.join(missing)} (run make images)"
        )
    plain = subprocess.run(
        ["podman", "run", "--rm", images["BOT_IMAGE"], "true"], capture_output=True, check=False
    )
    if plain.returncode != 0 and "CONTAINERS_CONF" not in os.environ:
        images["CONTAINERS_CONF"] = str(REPO / "deploy" / "podman" / "containers.conf")
    return images


def start(fleet: Fleet) -> None:
    fleet.compose("down", "-v", check=False)  # leftovers of an interrupted run
    log("starting PostgreSQL and the S3 server")
    fleet.compose("up", "-d", "--no-deps", "postgres", "s3")
    fleet.wait_healthy("postgres", "s3")
    log("running the migrations (one-shot service)")
    fleet.compose("up", "-d", "--no-deps", "migrate")
    migrate = fleet.container("migrate")
    code = fleet.podman("wait", migrate, timeout=STAGE_TIMEOUT_S).stdout.strip()
    output = fleet.podman("logs", migrate, check=False)
    if code != "0":
        raise CheckFailed(f"migrate exited {code}:\n{output.stdout}{output.stderr}")
    log(f"migrate: {(output.stdout.strip() or output.stderr.strip()).splitlines()[-1]}")
    log("starting two inference servers")
    fleet.compose("up", "-d", "--no-deps", "server-1", "server-2")
    fleet.wait_healthy("server-1", "server-2")
    log("starting two bots")
    fleet.compose("up", "-d", "--no-deps", "bot-1", "bot-2")
    fleet.wait_healthy("bot-1", "bot-2")


@dataclass
class Submission:
    tag: str
    user: str
    n: int
    states: list[str] = field(default_factory=list)
    images: int = 0
    error: str = ""
    # Kept open until the end: the buttons (V1...) act on the last result of the session.
    client: Any = None


def shown(job: Any) -> tuple[list[str], list[int]]:
    """What a playground call showed its client: the job states of its status panel, in order, and
    the number of images of each result gallery in the chat (the session's, oldest first)."""
    states = []
    for outputs in job.outputs():
        status = next((o for o in outputs if isinstance(o, str) and 'class="job-status"' in o), "")
        if m := re.search(r'data-state="(\w+)"', status):
            states.append(m.group(1))
    final = job.outputs()[-1]
    chat = next(o for o in final if isinstance(o, list))
    galleries = [c for m in chat for c in m["content"] if c.get("component") == "gallery"]
    return states, [len(g["value"]) for g in galleries]


def submit(fleet: Fleet, sub: Submission, steps: int) -> Submission:
    from gradio_client import Client

    try:
        sub.client = Client(
            fleet.playground_url, auth=(sub.user, fleet.password), verbose=False, download_files=False
        )
        job = sub.client.submit(
            f"/imagine a lighthouse {sub.tag} --n {sub.n} --steps {steps}", api_name="/imagine"
        )
        job.result(timeout=600)
        sub.states, galleries = shown(job)
        sub.images = sum(galleries)
    except Exception as e:  # reported per submission; the check fails on it
        sub.error = f"{type(e).__name__}: {e}"
    return sub


def vary(sub: Submission) -> tuple[list[str], list[int]] | str:
    """V1 under the session's last result: what the client was shown, or the error."""
    try:
        job = sub.client.submit(api_name="/variation_1")
        job.result(timeout=600)
        return shown(job)
    except Exception as e:  # reported per variation; the check fails on it
        return f"{type(e).__name__}: {e}"


def wait_for(fleet: Fleet, what: str, query: str, ok: Any, timeout: float) -> list[list[str]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = fleet.sql(query)
        if ok(rows):
            return rows
        if time.monotonic() > deadline:
            raise CheckFailed(f"timed out waiting for {what}: {rows}")
        time.sleep(0.5)


def run_check(fleet: Fleet, jobs: int, steps: int) -> list[str]:
    """Submits, kills, waits; returns the failures (empty: PASS)."""
    subs = [Submission(tag=f"t{i:03d}", user=USERS[i % len(USERS)], n=1 + i % 2) for i in range(jobs)]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=jobs)
    started = time.monotonic()
    futures = [pool.submit(submit, fleet, s, steps) for s in subs]
    log(f"submitted {jobs} jobs through {fleet.playground_url} as {', '.join(USERS)}")

    # The other bot dies while it holds running jobs; then a server dies while jobs still run.
    held = wait_for(
        fleet, "bot-2 to hold a running job",
        f"SELECT count(*) FROM jobs WHERE state = 'running' AND lease_owner LIKE '{fleet.hostname('bot-2')}:%'",
        lambda rows: int(rows[0][0]) > 0, timeout=180,
    )  # fmt: skip
    fleet.crash("bot-2")
    log(f"killed bot-2 (SIGKILL) holding {held[0][0]} running job(s)")
    wait_for(
        fleet, "more jobs to run", "SELECT count(*) FROM jobs WHERE state = 'running'",
        lambda rows: int(rows[0][0]) > 0, timeout=120,
    )  # fmt: skip
    fleet.crash("server-1")
    counts = dict((s, int(c)) for s, c in fleet.sql("SELECT state, count(*) FROM jobs GROUP BY state"))
    log(f"killed server-1 (SIGKILL); jobs by state then: {counts}")

    results = [f.result() for f in futures]
    pool.shutdown()
    elapsed = time.monotonic() - started
    log(f"all {jobs} submissions answered in {elapsed:.0f} s")

    rows = fleet.sql(
        "SELECT j.id, j.prompt, j.state, json_array_length(j.seeds), j.delivered_at IS NOT NULL, j.delivery_attempts, j.attempts,"
        " coalesce(j.lease_owner, ''), (SELECT count(*) FROM images i WHERE i.job_id = j.id)"
        " FROM jobs j ORDER BY j.id"
    )
    failures = []
    by_tag: dict[str, list[list[str]]] = {}
    for row in rows:
        if m := re.search(r"\b(t\d{3})\b", row[1]):
            by_tag.setdefault(m.group(1), []).append(row)
    if len(rows) != jobs:
        failures.append(f"{len(rows)} job rows for {jobs} submissions")
    for sub in results:
        if sub.error:
            failures.append(f"{sub.tag}: the client got {sub.error}")
            continue
        if not sub.states or sub.states[-1] != "succeeded":
            failures.append(f"{sub.tag}: the client saw {sub.states[-3:]}")
        if sub.images != sub.n:
            failures.append(f"{sub.tag}: the client was shown {sub.images} image(s) of {sub.n}")
        found = by_tag.get(sub.tag, [])
        if len(found) != 1:
            failures.append(f"{sub.tag}: {len(found)} job rows")
            continue
        job_id, _, state, n, delivered, delivery_attempts, attempts, lease, images = found[0]
        if state != "succeeded" or delivered != "t" or lease:
            failures.append(
                f"job {job_id} ({sub.tag}): state {state}, delivered {delivered}, lease {lease!r}"
            )
        if int(images) != int(n):
            failures.append(f"job {job_id} ({sub.tag}): {images} image rows for n={n}")
        if int(delivery_attempts) < 1:
            failures.append(f"job {job_id} ({sub.tag}): no delivery attempt counted")
    retried = [r for r in rows if int(r[6]) > 1]
    redelivered = [r for r in rows if int(r[5]) > 1]
    log(
        f"jobs: {len(rows)}; run more than once (takeover or fail-over): {len(retried)}; "
        f"delivery attempts > 1: {len(redelivered)} (ids {[int(r[0]) for r in redelivered]})"
    )
    # A delivery is counted before the adapter is called; a second count means the bot died between
    # the two and the next holder delivered it (the playground's delivery repeats nothing visible).
    # More than two would mean deliveries repeated without a crash.
    failures += [f"job {r[0]}: {r[5]} delivery attempts" for r in rows if int(r[5]) > 2]
    restarts = {s: fleet.podman("inspect", "--format", "{{.RestartCount}}", fleet.container(s)).stdout.strip()
                for s in ("bot-2", "server-1")}  # fmt: skip
    log(f"restarts after the kills (restart: unless-stopped): {restarts}")
    if not failures:
        failures += check_shared_storage(fleet, results, steps)
    for sub in results:
        if sub.client is not None:
            sub.client.close()
    return failures


def bucket_objects(fleet: Fleet) -> set[str]:
    """The object keys in the bucket, listed inside the S3 container (its port is not published)."""
    script = (
        "import boto3; c = boto3.client('s3', endpoint_url='http://127.0.0.1:9000', region_name='us-east-1',"
        " aws_access_key_id='check', aws_secret_access_key='check')\n"
        f"for page in c.get_paginator('list_objects_v2').paginate(Bucket='{BUCKET}'):\n"
        "    for o in page.get('Contents', []): print(o['Key'])"
    )
    return set(fleet.podman("exec", fleet.container("s3"), "python", "-c", script).stdout.split())


def missing_objects(fleet: Fleet) -> list[str]:
    """Image rows whose object is not in the bucket (the bots' layout: <prefix>ab/<key>.png)."""
    keys = [row[0] for row in fleet.sql("SELECT DISTINCT storage_key FROM images")]
    objects = bucket_objects(fleet)
    log(f"bucket {BUCKET}: {len(objects)} objects; image rows name {len(keys)} distinct keys")
    return [k for k in keys if f"imagine/{k[:2]}/{k}.png" not in objects]


def made_by(fleet: Fleet) -> dict[int, set[str]]:
    """Which bot process stored each job's result, from the bots' logs ("job N succeeded: ...")."""
    made: dict[int, set[str]] = {}
    for service in ("bot-1", "bot-2"):
        logs = fleet.podman("logs", fleet.container(service), check=False)
        for m in re.finditer(r"job (\d+) succeeded: \d+ image", logs.stdout + logs.stderr):
            made.setdefault(int(m.group(1)), set()).add(service)
    return made


def jobs_by_tag(fleet: Fleet) -> dict[str, int]:
    """The job id of each submission's tag (t000... in its prompt)."""
    rows = fleet.sql("SELECT id, prompt FROM jobs")
    return {m.group(1): int(job_id) for job_id, prompt in rows if (m := re.search(r"\b(t\d{3})\b", prompt))}


def check_shared_storage(fleet: Fleet, results: list[Submission], steps: int) -> list[str]:
    """Every image is in the bucket, and bot-1 varies images that bot-2 made: the bots share no
    folder, so bot-1 can read them only from the bucket."""
    failures = [f"image {k} is not in the bucket" for k in missing_objects(fleet)]
    job_of = jobs_by_tag(fleet)
    made = made_by(fleet)
    parents = [s for s in results if made.get(job_of.get(s.tag, -1)) == {"bot-2"}]
    by_bot1 = sum(1 for m in made.values() if m == {"bot-1"})
    log(f"jobs made by bot-2: {len(parents)} of the {len(results)} submissions; by bot-1: {by_bot1}")
    # bot-2 came back late or claimed nothing: give it jobs until it has made one (it gets about
    # half of what arrives while both run).
    for attempt in range(8):
        if parents:
            break
        sub = submit(fleet, Submission(tag=f"t{900 + attempt}", user=USERS[0], n=1), steps)
        job_of = jobs_by_tag(fleet)
        if not sub.error and made_by(fleet).get(job_of.get(sub.tag, -1)) == {"bot-2"}:
            parents.append(sub)
        elif sub.client is not None:
            sub.client.close()
    if not parents:
        return [*failures, "bot-2 made no job to vary (see its logs)"]
    parents = parents[:VARIATIONS]
    # Stopped (not killed): it hands its claims back and the restart policy leaves it down, so every
    # job from now on runs on bot-1.
    fleet.podman("stop", "-t", "10", fleet.container("bot-2"), timeout=60)
    log(f"stopped bot-2; bot-1 varies its jobs {[job_of[p.tag] for p in parents]} (V1)")
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(parents)) as pool:
        outcomes = list(pool.map(vary, parents))
    log(f"{len(parents)} variation(s) answered in {time.monotonic() - started:.0f} s")
    made = made_by(fleet)
    for parent, outcome in zip(parents, outcomes, strict=True):
        parent_id = job_of[parent.tag]
        if isinstance(outcome, str):
            failures.append(f"variation of job {parent_id}: the client got {outcome}")
            continue
        rows = fleet.sql(
            "SELECT id, state, json_array_length(seeds), coalesce(error, ''),"
            " (SELECT count(*) FROM images i WHERE i.job_id = j.id)"
            f" FROM jobs j WHERE kind = 'variation' AND parent_job_id = {parent_id}"
        )
        if len(rows) != 1:
            failures.append(f"variation of job {parent_id}: {len(rows)} job rows")
            continue
        job_id, state, n, error, images = rows[0]
        states, galleries = outcome
        if state != "succeeded" or int(images) != int(n):
            failures.append(
                f"variation {job_id} of job {parent_id}: {state} {error!r}, {images} images of {n}"
            )
        if not states or states[-1] != "succeeded" or galleries[-1:] != [int(n)]:
            failures.append(f"variation {job_id}: the client saw {states[-3:]}, galleries {galleries}")
        if made.get(int(job_id)) != {"bot-1"}:
            failures.append(f"variation {job_id}: made by {made.get(int(job_id))}, not bot-1 alone")
    failures += [f"image {k} is not in the bucket" for k in missing_objects(fleet)]
    if not failures:
        log(f"shared storage: {len(parents)} image(s) made by bot-2 varied by bot-1 through the bucket")
    fleet.podman("start", fleet.container("bot-2"), check=False)  # as it was, for --keep
    for parent in parents:
        if parent not in results:  # the extra submissions' sessions (run_check closes the rest)
            parent.client.close()
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=24, help="jobs to submit (default 24)")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps per job (default 30)")
    parser.add_argument("--keep", action="store_true", help="leave the containers running")
    parser.add_argument("--skip-build", action="store_true", help="use the images built last time")
    parser.add_argument(
        "--compose-file", action="append", default=[], type=Path,
        help="one more compose file over the others (e.g. to break something on purpose and see FAIL)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if not shutil.which("podman"):
        print(
            "deploy-test: podman is not installed (Debian/Ubuntu: apt-get install -y podman runc debootstrap)",
            file=sys.stderr,
        )
        return 2

    begun = time.monotonic()
    failures: list[str] = []
    fleet = None
    try:
        images = build_images(args.skip_build)
        password = secrets.token_urlsafe(16)
        env = {
            **os.environ,
            **images,
            "POSTGRES_PASSWORD": secrets.token_urlsafe(16),
            "INFERENCE_API_TOKEN": secrets.token_urlsafe(32),
            "PLAYGROUND_PASSWORD": password,
            "PLAYGROUND_PORT": str(free_port()),
            # The compose file's own S3 server (moto accepts any keys; random ones show nothing
            # depends on their values).
            "S3_ENDPOINT_URL": "http://s3:9000",
            "S3_BUCKET": BUCKET,
            "S3_REGION": "us-east-1",
            "S3_ACCESS_KEY_ID": secrets.token_hex(10),
            "S3_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
        }
        # A developer's deploy/.env must not leak in: everything the compose file reads is set here.
        for key in (
            "DISCORD_TOKEN",
            "SLACK_BOT_TOKEN",
            "SLACK_SIGNING_SECRET",
            "SLACK_APP_TOKEN",
            "PLAYGROUND_ADMIN_PASSWORD",
        ):
            env[key] = ""
        fleet = Fleet(
            env, f"http://127.0.0.1:{env['PLAYGROUND_PORT']}/", password, [*COMPOSE_FILES, *args.compose_file]
        )
        start(fleet)
        log(f"fleet up in {time.monotonic() - begun:.0f} s since the start")
        failures = run_check(fleet, args.jobs, args.steps)
    except CheckFailed as e:
        failures.append(str(e))
    finally:
        if fleet is not None and not args.keep:
            fleet.compose("down", "-v", "-t", "5", check=False)
            log("containers and volumes removed")
    took = time.monotonic() - begun
    if failures:
        print(f"\ndeploy-test: FAIL after {took:.0f} s")
        for failure in failures:
            print(f"  - {failure}")
        return 1
    print(
        f"\ndeploy-test: PASS in {took:.0f} s ({args.jobs} jobs, a bot and a server killed mid-run, each job"
        " delivered once; images in the bucket, bot-2's varied by bot-1)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
