"""Bearer-token auth, start-up refusals, and the typed config."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from inference_server.__main__ import main
from inference_server.app import create_app
from inference_server.config import load_config
from inference_server.config_loader import ConfigError
from tests.server.conftest import Server, make_config, running_server

REPO = Path(__file__).resolve().parents[2]


async def test_v1_needs_the_bearer_token(server: Server) -> None:
    url = f"{server.url}/v1/txt2img"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dGVzdA=="}):
        async with server.session.post(url, json={"prompt": "x"}, headers=headers) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "unauthorized"
    for path in ("/health", "/ready", "/metrics"):
        async with server.session.get(f"{server.url}{path}") as resp:
            assert resp.status == 200
    assert (await server.generate("txt2img", {"prompt": "x"}))["images"]


def test_refuses_to_start_without_a_token(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFERENCE_API_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="INFERENCE_API_TOKEN"):
        create_app(make_config(tiny_model))


async def test_allow_no_auth_opens_v1(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFERENCE_API_TOKEN", raising=False)
    config = make_config(tiny_model, server={"allow_no_auth": True})
    async with running_server(config, token="") as server:
        async with server.session.post(f"{server.url}/v1/txt2img", json={"prompt": "open"}) as resp:
            assert resp.status == 200


def test_repo_config_loads_with_documented_defaults() -> None:
    config = load_config(REPO / "config.toml", environ={})
    assert config.server.host == "127.0.0.1"
    # Size, steps and guidance are left to the model family (the embedded model's native 64x64).
    assert config.model.path == "embedded" and (config.model.width, config.model.height) == (None, None)
    assert config.batching.engine == "dynamic"


def test_env_overrides_and_bad_values_name_the_key() -> None:
    config = load_config({}, environ={"IMAGINE_BATCHING_MAX_BATCH_SIZE": "4"})
    assert config.batching.max_batch_size == 4
    with pytest.raises(ConfigError, match=r"\[model\] width"):
        load_config({"model": {"width": 65}}, environ={})
    with pytest.raises(ConfigError, match=r"\[batching\] max_wait_ms"):
        load_config({"batching": {"max_wait_ms": "soon"}}, environ={})
    with pytest.raises(ConfigError, match="unknown key"):
        load_config({"inference_server": {"prot": 1}}, environ={})


@pytest.mark.parametrize(
    ("section", "values", "key"),
    [
        # TOML and the environment accept inf and nan; no setting means anything with them.
        ("inference_server", {"openai_url_ttl_s": float("inf")}, "openai_url_ttl_s"),
        ("inference_server", {"default_timeout_s": float("nan")}, "default_timeout_s"),
        ("batching", {"max_wait_ms": "inf"}, "max_wait_ms"),
        ("inference_server", {"header_timeout_s": 0}, "header_timeout_s"),
        ("inference_server", {"body_timeout_s": -1}, "body_timeout_s"),
        ("inference_server", {"log_level": "LOUD"}, "log_level"),
        ("inference_server", {"public_url": "images.example.com"}, "public_url"),
        ("inference_server", {"public_url": "https://"}, "public_url"),
        ("inference_server", {"public_url": "https://x.example/?a=1"}, "public_url"),
        ("inference_server", {"public_url": "https://x.example:99999"}, "public_url"),
        ("inference_server", {"public_url": "https://user:pw@x.example"}, "public_url"),
        ("model", {"cpu_threads": 10**30}, "cpu_threads"),
    ],
)
def test_meaningless_values_are_refused_at_start_up_naming_the_key(
    section: str, values: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError, match=rf"\[{section}\] {key}"):
        load_config({section: values}, environ={})
    env = {f"IMAGINE_{section}_{name}".upper(): str(v) for name, v in values.items()}
    with pytest.raises(ConfigError, match=key):
        load_config({}, environ=env)


def test_public_url_may_carry_a_port_and_path() -> None:
    config = load_config({"inference_server": {"public_url": "https://x.example:8443/imagine/"}}, environ={})
    assert config.server.public_url == "https://x.example:8443/imagine/"


@pytest.mark.parametrize("token", ["has space", "tab\there", "caf\u00e9", "nul\x00"])
def test_a_token_no_client_can_send_is_refused(tiny_model: Path, token: str) -> None:
    with pytest.raises(ConfigError, match="INFERENCE_API_TOKEN must be printable ASCII"):
        create_app(make_config(tiny_model), api_token=token)


def test_main_exits_with_a_clear_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    missing = tmp_path / "no-such-model"
    missing.mkdir()
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[model]\npath = "{missing}"\n')
    monkeypatch.setenv("INFERENCE_API_TOKEN", "t")
    assert main(["--config", str(cfg)]) == 2
    assert "model_index.json" in capsys.readouterr().err
    cfg.write_text("[model]\nwidth = 12\n")
    assert main(["--config", str(cfg)]) == 2
    assert "[model] width" in capsys.readouterr().err


async def test_model_that_fails_to_load_is_reported_not_served(tmp_path: Path) -> None:
    from aiohttp import web

    from inference_server import keys
    from tests.server.conftest import AUTH, TOKEN

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    app = create_app(make_config(broken), api_token=TOKEN)
    fatal: list[BaseException] = []
    app[keys.ON_FATAL] = fatal.append  # main() stops the process here and exits 1
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        for _ in range(1200):  # at least 60 s: a loaded CI machine is slow
            if fatal:
                break
            await asyncio.sleep(0.05)
        assert fatal and "broken" in str(fatal[0])
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/ready") as resp:
                assert resp.status == 503
            async with session.get(f"{url}/health") as resp:
                assert (await resp.json())["status"] == "failed"
            async with session.post(f"{url}/v1/txt2img", json={"prompt": "x"}, headers=AUTH) as resp:
                assert resp.status == 503
                assert resp.headers["Retry-After"]
                assert (await resp.json())["error"]["code"] == "not_ready"
    finally:
        await runner.cleanup()
