"""`build_backend` reads [backends] into a typed config and builds the backend it names."""

from __future__ import annotations

import pytest

from bot.backends import BackendsConfig, build_backend, load_backends_config
from bot.backends.base import GenerationParams
from bot.backends.fake import FakeBackend
from bot.backends.huggingface import HuggingFaceBackend
from bot.backends.inference_server import InferenceServerBackend
from inference_server.config_loader import ConfigError, read_toml


def test_the_shipped_config_toml_section_loads_with_documented_defaults():
    cfg = load_backends_config(read_toml("config.toml"), {})
    assert cfg == BackendsConfig()  # the file documents the defaults, it does not change them
    assert cfg.kind == "inference_server" and cfg.urls == ("http://127.0.0.1:8080",)


async def test_builds_each_kind(tmp_path):
    server = build_backend(
        {"backends": {"urls": ["http://a:1", "http://b:2/"]}}, {"INFERENCE_API_TOKEN": "t"}
    )
    assert isinstance(server, InferenceServerBackend) and server.urls == ["http://a:1", "http://b:2"]
    fake = build_backend({"backends": {"kind": "fake"}}, {})
    assert isinstance(fake, FakeBackend)
    assert len(await fake.generate(GenerationParams("txt2img", "x", steps=1))) == 1
    hf = build_backend(
        {"backends": {"kind": "huggingface", "hf_model": "org/model"}},
        {"HUGGING_FACE_API_KEY": "hf_x"},
        dotenv_path=None,
    )
    assert isinstance(hf, HuggingFaceBackend) and hf.model == "org/model"
    for backend in (server, fake, hf):
        await backend.close()


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
    ],
)
def test_bad_values_name_the_key(section, named):
    with pytest.raises(ConfigError) as info:
        build_backend({"backends": section}, {})
    assert named in str(info.value)


def test_huggingface_without_a_key_is_a_configuration_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        build_backend({"backends": {"kind": "huggingface"}}, {}, dotenv_path=tmp_path / "missing.env")
    assert "HUGGING_FACE_API_KEY" in str(info.value)


async def test_secrets_fall_back_to_a_dotenv_file(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("HUGGING_FACE_API_KEY=hf_from_file\n")
    hf = build_backend({"backends": {"kind": "huggingface"}}, {}, dotenv_path=dotenv)
    assert isinstance(hf, HuggingFaceBackend) and hf._api_key == "hf_from_file"
    await hf.close()
