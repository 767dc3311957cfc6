from dataclasses import dataclass, field
from typing import Literal

import pytest

from inference_server.config_loader import ConfigError, load_section


@dataclass(frozen=True)
class Sample:
    host: str = "127.0.0.1"
    port: int = 8000
    ratio: float = 0.5
    debug: bool = False
    names: list[str] = field(default_factory=list)
    mode: Literal["a", "b"] = "a"
    limit: int | None = None


def test_defaults_file_values_and_env_override():
    cfg = load_section({"s": {"port": 9000, "names": ["x"]}}, "s", Sample, environ={"IMAGINE_S_RATIO": "2"})
    assert cfg == Sample(port=9000, names=["x"], ratio=2.0)


def test_env_beats_file_and_parses_types():
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
    ],
)
def test_errors_name_the_key(section, needle):
    with pytest.raises(ConfigError) as e:
        load_section({"s": section}, "s", Sample, environ={})
    assert needle in str(e.value)


def test_env_error_names_the_variable():
    with pytest.raises(ConfigError, match=r"\$IMAGINE_S_PORT"):
        load_section({}, "s", Sample, environ={"IMAGINE_S_PORT": "x"})
