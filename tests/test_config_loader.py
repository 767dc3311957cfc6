"""The config loaders of the bot (bot/settings.py) and of the server (inference_server/config_loader.py):
each package owns its own, and both follow the same rules, checked here on the same cases."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

import bot.settings
import inference_server.config_loader


@dataclass(frozen=True)
class Sample:
    host: str = "127.0.0.1"
    port: int = 8000
    ratio: float = 0.5
    debug: bool = False
    names: list[str] = field(default_factory=list)
    mode: Literal["a", "b"] = "a"
    limit: int | None = None


@pytest.fixture(params=[bot.settings, inference_server.config_loader], ids=["bot", "server"])
def loader(request):
    return request.param


def test_defaults_file_values_and_env_override(loader):
    load_section = loader.load_section
    cfg = load_section({"s": {"port": 9000, "names": ["x"]}}, "s", Sample, environ={"IMAGINE_S_RATIO": "2"})
    assert cfg == Sample(port=9000, names=["x"], ratio=2.0)


def test_env_beats_file_and_parses_types(loader):
    load_section = loader.load_section
    env = {
        "IMAGINE_S_PORT": "81",
        "IMAGINE_S_DEBUG": "yes",
        "IMAGINE_S_NAMES": "a, b",
        "IMAGINE_S_LIMIT": "3",
    }
    cfg = load_section({"s": {"port": 80}}, "s", Sample, environ=env)
    assert (cfg.port, cfg.debug, cfg.names, cfg.limit) == (81, True, ["a", "b"], 3)


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ({"port": "eighty"}, "[s] port: expected an integer"),
        ({"prot": 1}, "unknown key(s): prot"),
        ({"mode": "c"}, "[s] mode: must be one of"),
        ({"debug": 2}, "[s] debug: expected true or false"),
        ({"names": "x"}, "[s] names: expected a list"),
        ({"names": ["a", 3]}, "[s] names[1]: expected a string, got 3"),
        ({"port": True}, "[s] port: expected a number, got True"),
        ({"ratio": float("inf")}, "[s] ratio: expected a finite number"),
        ({"host": 5}, "[s] host: expected a string, got 5"),
    ],
)
def test_errors_name_the_key(loader, section, needle):
    with pytest.raises(loader.ConfigError) as e:
        loader.load_section({"s": section}, "s", Sample, environ={})
    assert needle in str(e.value)


def test_every_wrong_key_is_named_at_once(loader):
    with pytest.raises(loader.ConfigError) as e:
        loader.load_section({"s": {"port": "x", "mode": "z"}}, "s", Sample, environ={})
    assert "[s] port: expected an integer, got 'x'" in str(e.value)
    assert "[s] mode: must be one of 'a', 'b', got 'z'" in str(e.value)


def test_env_error_names_the_variable(loader):
    with pytest.raises(
        loader.ConfigError, match=r"\[s\] port \(from \$IMAGINE_S_PORT\): expected an integer"
    ):
        loader.load_section({}, "s", Sample, environ={"IMAGINE_S_PORT": "x"})


def test_env_names_are_case_insensitive_and_lists_take_json(loader):
    cfg = loader.load_section(
        {}, "s", Sample, environ={"imagine_s_port": "12", "IMAGINE_S_NAMES": '["a,b", "c"]'}
    )
    assert (cfg.port, cfg.names) == (12, ["a,b", "c"])


def test_post_init_checks_still_run(loader):
    @dataclass(frozen=True)
    class Checked:
        size: int = 8

        def __post_init__(self):
            if self.size % 8:
                raise loader.ConfigError(f"[c] size: must be a multiple of 8, got {self.size}")

    with pytest.raises(loader.ConfigError, match=r"\[c\] size: must be a multiple of 8, got 12"):
        loader.load_section({}, "c", Checked, environ={"IMAGINE_C_SIZE": "12"})


def test_a_section_that_is_not_a_table_is_an_error(loader):
    with pytest.raises(loader.ConfigError, match=r"\[s\] must be a table"):
        loader.load_section({"s": 3}, "s", Sample, environ={})
