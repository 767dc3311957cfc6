"""`[registry]` and `[models.NAME]` read from TOML: the registry of one (`[model]` alone), named models,
the default, environment overrides, and start-up errors that name the key."""

from __future__ import annotations

import pytest

from inference_server.config import load_config
from inference_server.config_loader import ConfigError


def test_model_alone_is_a_registry_of_one_named_after_its_folder() -> None:
    config = load_config({"model": {"path": "/srv/models/dreamy-v2"}}, environ={})
    assert list(config.model_entries()) == ["dreamy-v2"]
    assert config.default_model() == "dreamy-v2"
    assert list(load_config({}, environ={}).model_entries()) == ["embedded"]
    single = load_config({"model": {"path": "/srv/ckpt/juggernaut.safetensors"}}, environ={})
    assert list(single.model_entries()) == ["juggernaut"]


def test_named_models_and_the_default() -> None:
    data = {
        "models": {
            "sd15": {"path": "/m/sd15", "steps": 20},
            "xl": {"path": "/m/xl.safetensors", "config": "/m/xl-config", "family": "sdxl", "default": True},
        }
    }
    config = load_config(data, environ={})
    # Named models only: no implicit embedded model beside them.
    assert list(config.model_entries()) == ["sd15", "xl"]
    assert config.default_model() == "xl"
    assert config.models["xl"].single_file and config.models["xl"].family == "sdxl"
    with_model = load_config({**data, "model": {"path": "embedded"}}, environ={})
    assert list(with_model.model_entries()) == ["embedded", "sd15", "xl"]
    chosen = load_config({**data, "registry": {"default_model": "sd15"}}, environ={})
    assert chosen.default_model() == "sd15"
    # Without a flag or default_model, the first model is the default.
    first = load_config({"models": {"a": {"path": "/m/a"}, "b": {"path": "/m/b"}}}, environ={})
    assert first.default_model() == "a"


def test_environment_overrides_a_named_model() -> None:
    config = load_config(
        {"models": {"xl": {"path": "/m/xl"}}},
        environ={"IMAGINE_MODELS_XL_STEPS": "12", "IMAGINE_REGISTRY_LOAD": "start"},
    )
    assert config.models["xl"].steps == 12 and config.registry.load == "start"


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"models": {"a": {"path": "/a", "default": True}, "b": {"path": "/b", "default": True}}}, "several"),
        ({"models": {"a": {"path": "/a"}}, "registry": {"default_model": "zz"}}, "[registry] default_model"),
        ({"models": {"a": {"path": "/a", "steps": 0}}}, "[models.a] steps"),
        ({"models": {"a": {"path": "/a", "colour": 1}}}, "[models.a] unknown key(s): colour"),
        ({"models": {"a": {"path": "/a", "family": "sd4"}}}, "[models.a] family"),
        ({"models": {"bad name": {"path": "/a"}}}, "[models.bad name]"),
        ({"models": {"a": "x"}}, "[models] holds one table per model"),
        ({"model": {"path": "/m/a"}, "models": {"a": {"path": "/b"}}}, "taken by [model]"),
        ({"registry": {"memory_budget_mb": -1}}, "[registry] memory_budget_mb"),
        ({"registry": {"max_loras_per_request": 0}}, "[registry] max_loras_per_request"),
        ({"registry": {"load": "eager"}}, "[registry] load"),
    ],
)
def test_errors_name_the_key(data: dict, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(data, environ={})
    assert words in str(e.value)
