"""`make run` end to end: `python -m bot.launcher` starts the real processes (the inference server on
a tiny random pipeline saved to a temporary folder, the bot with the playground), an image is made
through the playground's HTTP API, and SIGINT (Ctrl-C) stops everything cleanly."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.playground.harness import free_port

REPO = Path(__file__).resolve().parents[2]
# Start-up imports torch, diffusers and gradio in two processes: generous on a busy 2-core machine.
READY_TIMEOUT_S = 240
STOP_TIMEOUT_S = 60
LABELLED = re.compile(r"^\d\d:\d\d:\d\d (\S+)\s*\| ")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    from inference_server.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-pipeline"))


class Launcher:
    """`python -m bot.launcher` in `cwd`, its output collected line by line."""

    def __init__(self, cwd: Path, env: dict[str, str]):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bot.launcher"],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output:
                return
            if self.proc.poll() is not None:
                self._reader.join(5)
                raise AssertionError(
                    f"launcher exited {self.proc.returncode} before {text!r}:\n{self.output}"
                )
            time.sleep(0.2)
        raise AssertionError(f"no {text!r} after {timeout}s:\n{self.output}")

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            rc = self.proc.wait(STOP_TIMEOUT_S)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self._kill_children()
        self._reader.join(5)
        return rc

    def _kill_children(self) -> None:
        """The launcher did not stop: end the process groups honcho started (each in its own
        session), so a failed test leaves no server or bot behind."""
        for pid in re.findall(r"started \(pid=(\d+)\)", self.output):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(pid), signal.SIGKILL)


def launcher_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGINE_")}
    env.update(
        IMAGINE_CONFIG=str(REPO / "config.toml"),
        IMAGINE_INFERENCE_SERVER_PORT=str(free_port()),
        IMAGINE_PLAYGROUND_PORT=str(free_port()),
        IMAGINE_MODEL_DEVICE="cpu",
        IMAGINE_MODEL_WARMUP="false",
        IMAGINE_BOT_DEFAULT_STEPS="2",
        HF_HUB_OFFLINE="1",
        # A developer's .env must not switch chat adapters on or point the test elsewhere.
        INFERENCE_API_TOKEN="", DATABASE_URL="", DISCORD_TOKEN="", SLACK_BOT_TOKEN="", PLAYGROUND_PASSWORD="",
    )  # fmt: skip
    env.update(overrides)
    return env


def jobs(db: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("select id, state, platform from jobs order by id").fetchall()


def imagine(url: str, text: str, wait: bool = True) -> Any:
    from gradio_client import Client

    client = Client(url, verbose=False, download_files=False)
    if wait:
        try:
            return client.predict(text, api_name="/imagine")
        finally:
            client.close()
    client.submit(text, api_name="/imagine")
    return client


def test_make_run_generates_an_image_and_stops_cleanly_on_ctrl_c(tmp_path, tiny_pipeline_dir):
    env = launcher_env(IMAGINE_MODEL_PATH=str(tiny_pipeline_dir))
    url = f"http://127.0.0.1:{env['IMAGINE_PLAYGROUND_PORT']}/"
    launcher = Launcher(tmp_path, env)
    try:
        launcher.wait_for(f"ready: open {url}", READY_TIMEOUT_S)
        outputs = imagine(url, "/imagine a tiny lighthouse --seed 3")
    finally:
        rc = launcher.interrupt()
    out = launcher.output
    assert rc in (0, 130), out  # 130: honcho's exit status after SIGINT
    # What the newcomer is told: the adapters and why, the URL, the token's origin.
    assert "adapter discord_adapter: off: DISCORD_TOKEN not set" in out
    assert "adapter playground: on" in out
    assert "INFERENCE_API_TOKEN from data/.inference_token (new)" in out
    assert "start-up heap frozen" in out  # bot.bootstrap.settle_heap, once the core is built
    # Every process's lines are labelled, and each stopped on its own after SIGTERM (no SIGKILL).
    labels = {m.group(1) for line in launcher.lines if (m := LABELLED.match(line))}
    assert {"launcher", "system", "server", "bot"} <= labels, labels
    assert "server stopped (rc=0)" in out and "bot stopped (rc=0)" in out, out
    assert "SIGKILL" not in out

    chat = next(o for o in outputs if isinstance(o, list))
    texts = [c.get("text", "") for m in chat for c in m["content"] if c.get("type") == "text"]
    assert "a tiny lighthouse" in texts[-1] and "seed 3" in texts[-1], texts
    [gallery] = [c for m in chat for c in m["content"] if c.get("component") == "gallery"]
    assert [item["caption"] for item in gallery["value"]] == ["V1"]
    assert jobs(tmp_path / "data" / "imagine.db") == [(1, "succeeded", "web")]
    images = list((tmp_path / "data" / "images").rglob("*.png"))
    assert len(images) == 1 and images[0].read_bytes().startswith(b"\x89PNG")
    token = tmp_path / "data" / ".inference_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text().strip()) >= 32


def test_ctrl_c_leaves_the_job_in_flight_queued_in_the_database(tmp_path):
    # The fake backend takes 2 minutes per job, so the job is surely running when Ctrl-C comes;
    # with a backend other than the inference server, the launcher starts the bot alone.
    env = launcher_env(IMAGINE_BACKENDS_KIND="fake", IMAGINE_BACKENDS_FAKE_DELAY_S="120")
    url = f"http://127.0.0.1:{env['IMAGINE_PLAYGROUND_PORT']}/"
    db = tmp_path / "data" / "imagine.db"
    launcher = Launcher(tmp_path, env)
    client = None
    try:
        launcher.wait_for(f"ready: open {url}", READY_TIMEOUT_S)
        client = imagine(url, "/imagine a slow painting", wait=False)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and jobs(db) != [(1, "running", "web")]:
            time.sleep(0.2)
        assert jobs(db) == [(1, "running", "web")]
    finally:
        rc = launcher.interrupt()
        if client is not None:
            client.close()
    out = launcher.output
    assert rc in (0, 130), out
    assert "inference server: off: [backends] kind = fake" in out
    assert "bot stopped (rc=0)" in out and "server started" not in out
    assert jobs(db) == [(1, "queued", "web")], "the job went back to the queue for the next start"
