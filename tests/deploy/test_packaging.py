"""Packaging: extras per role, a bot that imports nothing of the server, the server's config check
that `make run` uses instead of importing it, and the choice of torch build made by `make setup`."""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVER_ONLY = {"torch", "diffusers", "transformers", "accelerate", "safetensors", "tokenizers", "numpy"}
CHAT = {"discord.py", "slack-bolt", "slack-sdk", "gradio"}


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower() for r in requirements}


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_the_bot_core_depends_on_none_of_the_server_or_chat_libraries(project):
    base = requirement_names(project["dependencies"])
    assert not base & SERVER_ONLY, base & SERVER_ONLY
    assert not base & CHAT, base & CHAT


def test_each_role_has_its_extra_and_torch_is_pinned_exactly(project):
    extras = project["optional-dependencies"]
    assert SERVER_ONLY <= requirement_names(extras["server"])
    assert "torch==2.13.0" in extras["server"], "an open range pulls a multi-GB CUDA build"
    assert requirement_names(extras["discord"]) == {"discord.py"}
    assert requirement_names(extras["slack"]) == {"slack-bolt", "slack-sdk"}
    assert requirement_names(extras["playground"]) == {"gradio"}
    assert requirement_names(extras["s3"]) == {"aiobotocore"}
    assert extras["all"] == ["imagine-bot[server,discord,slack,playground,s3]"]
    # Only the server extra brings torch: no chat extra may drag it in through a plain name.
    for role in ("discord", "slack", "playground", "s3"):
        assert not requirement_names(extras[role]) & SERVER_ONLY, role


def test_the_bot_imports_none_of_torch_diffusers_transformers_or_the_server():
    # A subprocess: this test run has imported torch long ago.
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "deploy" / "bot_imports.py")],
        cwd=REPO, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "none of torch, diffusers, transformers, accelerate, inference_server imported" in done.stdout
    for app in ("discord: commands", "slack: bolt app", "playground: FastAPI"):
        assert app in done.stdout, done.stdout


def test_the_server_checks_its_own_config_for_the_launcher(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGINE_")}
    run = [sys.executable, "-m", "inference_server", "--check-config", "--config", str(REPO / "config.toml")]
    done = subprocess.run(
        run, cwd=tmp_path, env={**env, "IMAGINE_INFERENCE_SERVER_PORT": "18123"},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"host": "127.0.0.1", "port": 18123, "model": "embedded"}

    done = subprocess.run(
        run, cwd=tmp_path, env={**env, "IMAGINE_BATCHING_MAX_BATCH_SIZE": "many"},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert (
        "[batching] max_batch_size (from $IMAGINE_BATCHING_MAX_BATCH_SIZE): expected an integer"
        in done.stderr
    )


def test_the_launcher_reports_the_servers_refusal(tmp_path):
    from bot.launcher import ServerCheckFailed, check_server

    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGINE_")}
    env["IMAGINE_MODEL_PATH"] = str(tmp_path / "nothing-here")
    with pytest.raises(
        ServerCheckFailed, match=r"\[model\] path: .*nothing-here is not a diffusers pipeline folder"
    ):
        check_server(REPO / "config.toml", env)


# -- deploy/torch-index.sh: which torch build `make setup` asks pip for ---------------------------------


def torch_index(
    tmp_path: Path, *, gpu: bool, cpu_index: str, **extra: str
) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "nvidia-smi"
    if gpu:
        fake.write_text("#!/bin/sh\nexit 0\n")
        fake.chmod(0o755)
    elif fake.exists():
        fake.unlink()
    # Only the fake bin folder and the basic tools: a real nvidia-smi on the test machine must not count.
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "PYTHON": sys.executable,
        "TORCH_CPU_INDEX": cpu_index,
        **extra,
    }
    return subprocess.run(
        ["sh", str(REPO / "deploy" / "torch-index.sh")], env=env, capture_output=True, text=True, timeout=30,
        check=False,
    )  # fmt: skip


@pytest.fixture
def index_url():
    """A loopback stand-in for PyTorch's CPU index that answers 200."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html></html>")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/whl/cpu"
    finally:
        server.shutdown()
        server.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/whl/cpu"


def test_without_a_gpu_the_cpu_index_is_added_when_it_answers(tmp_path, index_url):
    done = torch_index(tmp_path, gpu=False, cpu_index=index_url)
    assert done.returncode == 0 and done.stdout.split() == ["--extra-index-url", index_url]
    assert "the CPU build" in done.stderr


def test_an_unreachable_cpu_index_is_left_out_so_pip_falls_through(tmp_path):
    done = torch_index(tmp_path, gpu=False, cpu_index=closed_port_url())
    assert done.returncode == 0 and done.stdout == ""
    assert "unreachable" in done.stderr


def test_with_an_nvidia_gpu_pypi_gives_the_cuda_build(tmp_path, index_url):
    done = torch_index(tmp_path, gpu=True, cpu_index=index_url)
    assert done.returncode == 0 and done.stdout == ""
    assert "CUDA build" in done.stderr


def test_torch_index_overrides_the_choice(tmp_path):
    url = "https://download.pytorch.org/whl/cu128"
    done = torch_index(tmp_path, gpu=False, cpu_index=closed_port_url(), TORCH_INDEX=url)
    assert done.stdout.split() == ["--extra-index-url", url]
    done = torch_index(tmp_path, gpu=False, cpu_index=closed_port_url(), TORCH_INDEX="none")
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("module", "adapter", "env", "extra"),
    [
        ("discord", "bot.discord_adapter", {"DISCORD_TOKEN": "t"}, "imagine-bot[discord]"),
        (
            "slack_bolt",
            "bot.slack_adapter",
            {"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_APP_TOKEN": "xapp-1"},
            "imagine-bot[slack]",
        ),
        ("gradio", "bot.playground", {}, "imagine-bot[playground]"),
    ],
)
def test_an_adapter_whose_extra_is_missing_is_off_and_names_the_extra(
    monkeypatch, module, adapter, env, extra
):
    import importlib

    # None in sys.modules is how Python spells "this module cannot be imported".
    monkeypatch.setitem(sys.modules, module, None)
    on, why = importlib.import_module(adapter).adapter_status(env)
    assert not on and why.startswith("off:") and extra in why, why


def test_the_image_build_context_holds_what_the_packages_link_to():
    # bot/migrations links to migrations/: a build context without the target ships a dangling link
    # and images without their Alembic scripts (found by `make deploy-test`: migrate failed).
    allowed = {
        line[1:].strip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    links = [p for pkg in ("bot", "inference_server") for p in (REPO / pkg).rglob("*") if p.is_symlink()]
    assert links, "bot/migrations is a link"
    containerfile = (REPO / "deploy" / "Containerfile").read_text()
    for link in links:
        target = link.resolve().relative_to(REPO).parts[0]
        assert target in allowed, f"{link.relative_to(REPO)} -> {target}, which .dockerignore leaves out"
        assert f"COPY {target} {target}" in containerfile, f"the Containerfile does not copy {target}"
