"""The server's config loading: `config.toml` sections plus `IMAGINE_<SECTION>_<KEY>` overrides.

One frozen dataclass per section (inference_server/config.py); pydantic-settings reads the
environment and validates the values, and the dataclass's `__post_init__` checks what is
well-typed but meaningless. Unknown keys and wrong types are start-up errors that name the key.
The bot has its own loader (bot/settings.py) with the same rules: neither package imports the
other, and what they share lives in pydantic-settings, not in one side's module.
Secrets never live in the file; they are read from the environment by the code that needs them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tomllib
import typing
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError, create_model, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict, SettingsError

T = TypeVar("T")

DEFAULT_CONFIG_PATH = "config.toml"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names the key."""


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The config file to use: an explicit path, else $IMAGINE_CONFIG, else ./config.toml."""
    return Path(explicit or os.environ.get("IMAGINE_CONFIG") or DEFAULT_CONFIG_PATH)


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None


def env_var_name(section: str, key: str) -> str:
    return f"IMAGINE_{section}_{key}".upper().replace(".", "_").replace("-", "_")


def load_section(
    source: Mapping[str, Any] | str | os.PathLike[str] | None,
    section: str,
    cls: type[T],
    *,
    environ: Mapping[str, str] | None = None,
) -> T:
    """Build `cls` (a dataclass) from `[section]` of `source`, then apply environment overrides.

    `source` is a parsed TOML mapping, a path, or None (defaults only). Missing keys take the
    dataclass defaults; unknown keys are errors so that a typo doesn't silently do nothing.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    data = {} if source is None else source if isinstance(source, Mapping) else read_toml(source)
    raw = data.get(section, {})
    if not isinstance(raw, Mapping):
        raise ConfigError(f"[{section}] must be a table")
    env = os.environ if environ is None else environ
    model = _settings_model(cls, section)
    token = _ENVIRON.set(env)
    try:
        settings = model(**raw)
    except ValidationError as e:
        raise ConfigError(_describe(e, section, model, env)) from None
    except SettingsError as e:  # an environment value that could not be decoded at all
        raise ConfigError(f"[{section}] {e} (environment variables {env_var_name(section, '')}*)") from None
    finally:
        _ENVIRON.reset(token)
    values = {name: getattr(settings, name) for name in settings.model_fields_set}
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[{section}] {e}") from None


class _Environment(EnvSettingsSource):
    """Environment variables from a given mapping (tests and the launcher pass their own); a list
    may be given as JSON or comma-separated."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]):
        super().__init__(settings_cls)
        self.env_vars = {name.lower(): value for name, value in environ.items()}

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        try:
            return json.loads(value)
        except ValueError:
            return [item.strip() for item in value.split(",") if item.strip()]


# The environment of the load_section call in progress: the settings class of a section is built
# once (pydantic builds a validator for it, ~5 ms), the environment differs between calls.
_ENVIRON: ContextVar[Mapping[str, str]] = ContextVar("environ")


@functools.cache
def _settings_model(cls: type, section: str) -> type[BaseSettings]:
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            fields[f.name] = (hints[f.name], f.default)
        elif f.default_factory is not dataclasses.MISSING:
            fields[f.name] = (hints[f.name], FieldInfo(default_factory=f.default_factory))
        else:
            fields[f.name] = (hints[f.name], ...)

    class Section(BaseSettings):
        model_config = SettingsConfigDict(
            env_prefix=env_var_name(section, ""), extra="forbid", allow_inf_nan=False, case_sensitive=False
        )

        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, **_others):  # type: ignore[override]
            # The environment beats the file; .env files are loaded by the entry points.
            return (_Environment(settings_cls, _ENVIRON.get()), init_settings)

        @field_validator("*", mode="before")
        @classmethod
        def _no_bool_numbers(cls, value: Any, info: Any) -> Any:
            # pydantic reads true as 1; a number field set to true is a mistake worth naming.
            hint = hints[info.field_name]
            if isinstance(value, bool) and (
                hint in (int, float) or typing.get_args(hint)[:1] in ((int,), (float,))
            ):
                raise ValueError("expected a number")
            return value

    return create_model(f"{cls.__name__}Settings", __base__=Section, **fields)


# Shorter wording for pydantic's most common complaints about a config value.
_MESSAGES = {
    "int_parsing": "expected an integer",
    "int_type": "expected an integer",
    "int_from_float": "expected an integer",
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "finite_number": "expected a finite number",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "tuple_type": "expected a list",
    "dict_type": "expected a table",
}


def _describe(error: ValidationError, section: str, model: type[BaseSettings], env: Mapping[str, str]) -> str:
    unknown = sorted(str(e["loc"][0]) for e in error.errors() if e["type"] == "extra_forbidden")
    if unknown:
        known = ", ".join(sorted(model.model_fields))
        return f"[{section}] unknown key(s): {', '.join(unknown)} (known: {known})"
    problems = []
    for e in error.errors():
        name = str(e["loc"][0])
        where = f"[{section}] {name}" + "".join(f"[{part}]" for part in e["loc"][1:] if isinstance(part, int))
        var = env_var_name(section, name)
        if any(key.upper() == var for key in env):
            where += f" (from ${var})"
        if e["type"] == "literal_error":
            what = f"must be one of {e['ctx']['expected'].replace(' or ', ', ')}"
        elif e["type"] == "value_error":
            what = str(e["ctx"]["error"])
        else:
            what = _MESSAGES.get(e["type"], e["msg"][:1].lower() + e["msg"][1:])
        problems.append(f"{where}: {what}, got {e['input']!r}")
    return "; ".join(problems)
