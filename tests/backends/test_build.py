"""`build_backend` reads [backends] into a typed config and builds the backend it names."""

from __future__ import annotations

import pytest
from huggingface_hub import is_offline_mode

from bot.backends import BackendsConfig, build_backend, load_backends_config
from bot.backends.base import GenerationParams
from bot.backends.fake import FakeBackend
from bot.backends.huggingface import HuggingFaceBackend
from bot.backends.inference_server import InferenceServerBackend
from bot.settings import ConfigError, read_toml
from tests.backends.fake_hf import HF_TOKEN


def test_the_shipped_config_toml_section_loads_with_documented_defaults():
    cfg = load_backends_config(read_toml("config.toml"), {})
    assert cfg == BackendsConfig()  # the file documents the defaults, it does not change them
    assert cfg.kind == "inference_server" and cfg.urls == ("http://127.0.0.1:8080",)


async def test_builds_each_kind():
    server = build_backend(
        {"backends": {"urls": ["http://a:1", "http://b:2/"]}}, {"INFERENCE_API_TOKEN": "t"}
    )
    assert isinstance(server, InferenceServerBackend) and server.urls == ["http://a:1", "http://b:2"]
    fake = build_backend({"backends": {"kind": "fake"}}, {})
    assert isinstance(fake, FakeBackend)
    assert len(await fake.generate(GenerationParams("txt2img", "x", steps=1))) == 1
    for backend in (server, fake):
        await backend.close()


async def test_builds_the_huggingface_backend_with_the_token_from_either_variable(huggingface):
    section = {
        "kind": "huggingface",
        "hf_provider": "hf-inference",
        "hf_model": "org/model",
        "hf_image_to_image_model": "org/editor",
    }
    hf = build_backend({"backends": section}, {"HF_TOKEN": "hf_x"}, dotenv_path=None)
    assert isinstance(hf, HuggingFaceBackend)
    assert (hf.provider, hf.model, hf.image_to_image_model) == ("hf-inference", "org/model", "org/editor")
    await hf.close()
    # The original app's variable wins over huggingface_hub's; the token is what the router sees.
    huggingface.serve("org/model", "hf-inference")
    env = {"HUGGING_FACE_API_KEY": HF_TOKEN, "HF_TOKEN": "hf_other"}
    hf = build_backend({"backends": section}, env, dotenv_path=None)
    await hf.generate(GenerationParams("txt2img", "x"))
    await hf.close()
    assert huggingface.seen[0].headers["Authorization"] == f"Bearer {HF_TOKEN}"


def test_environment_overrides_keys():
    cfg = load_backends_config(
        {"backends": {"kind": "huggingface"}},
        {
            "IMAGINE_BACKENDS_KIND": "fake",
            "IMAGINE_BACKENDS_URLS": '["http://x:9"]',
            "IMAGINE_BACKENDS_MAX_RETRIES": "7",
        },
    )
    assert (cfg.kind, cfg.urls, cfg.max_retries) == ("fake", ("http://x:9",), 7)


@pytest.mark.parametrize(
    ("section", "named"),
    [
        ({"kind": "openai"}, "[backends] kind"),
        ({"urls": []}, "[backends] urls"),
        ({"urls": ["127.0.0.1:8000"]}, "[backends] urls[0]"),
        ({"connect_timeout_s": 0}, "[backends] connect_timeout_s"),
        ({"max_retries": -1}, "[backends] max_retries"),
        ({"max_retries": "many"}, "[backends] max_retries"),
        ({"retries": 3}, "retries"),
        ({"hf_base_url": "api-inference.huggingface.co"}, "[backends] hf_base_url"),
        ({"kind": "huggingface", "hf_provider": "groq"}, "[backends] hf_provider"),
        ({"kind": "huggingface", "hf_provider": "fal"}, "[backends] hf_provider"),
        (
            {"kind": "huggingface", "hf_base_url": "http://a:1", "hf_provider": "fal-ai"},
            "[backends] hf_provider",
        ),
        ({"kind": "huggingface", "hf_model": "https://x.example/sdxl"}, "[backends] hf_model"),
        (
            {"kind": "huggingface", "hf_image_to_image_model": "no spaces/al lowed"},
            "[backends] hf_image_to_image_model",
        ),
        ({"kind": "huggingface", "hf_timeout_s": 0}, "[backends] hf_timeout_s"),
        ({"hf_max_loading_wait_s": 300}, "hf_max_loading_wait_s"),
    ],
)
def test_bad_values_name_the_key(section, named):
    with pytest.raises(ConfigError) as info:
        build_backend({"backends": section}, {})
    assert named in str(info.value)


def test_huggingface_without_a_token_is_a_configuration_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        build_backend({"backends": {"kind": "huggingface"}}, {}, dotenv_path=tmp_path / "missing.env")
    assert "set HUGGING_FACE_API_KEY or HF_TOKEN" in str(info.value)
    assert "Make calls to Inference Providers" in str(info.value)


def test_huggingface_under_hf_hub_offline_is_a_configuration_error():
    # The test suite runs with HF_HUB_OFFLINE=1 (tests/conftest.py), as a bot sharing the
    # inference server's environment might: huggingface_hub would then refuse every call.
    assert is_offline_mode()
    with pytest.raises(ConfigError) as info:
        build_backend({"backends": {"kind": "huggingface"}}, {"HF_TOKEN": "hf_x"}, dotenv_path=None)
    assert "cannot work with HF_HUB_OFFLINE" in str(info.value)


async def test_secrets_fall_back_to_a_dotenv_file(tmp_path, huggingface):
    dotenv = tmp_path / ".env"
    dotenv.write_text(f"HF_TOKEN={HF_TOKEN}\n")
    huggingface.serve("org/model", "hf-inference")
    section = {"kind": "huggingface", "hf_provider": "hf-inference", "hf_model": "org/model"}
    hf = build_backend({"backends": section}, {}, dotenv_path=dotenv)
    await hf.generate(GenerationParams("txt2img", "x"))
    await hf.close()
    assert huggingface.seen[0].headers["Authorization"] == f"Bearer {HF_TOKEN}"
