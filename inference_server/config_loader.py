"""Typed configuration: one TOML file, one frozen dataclass per section, env overrides.

Both the inference server and the bot read `config.toml` through this module, so the rules are the
same everywhere: unknown keys and wrong types are start-up errors that name the key, and any key can
be overridden by `IMAGINE_<SECTION>_<KEY>` in the environment (containers and CI set env, not files).
Secrets never live in the file; they are read from the environment by the code that needs them.
This module imports only the standard library, so the bot can use it without pulling in torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

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
    if source is None:
        data: Mapping[str, Any] = {}
    elif isinstance(source, Mapping):
        data = source
    else:
        data = read_toml(source)
    raw = dict(data.get(section, {}) or {})
    if not isinstance(raw, dict):
        raise ConfigError(f"[{section}] must be a table")
    env = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"[{section}] unknown key(s): {', '.join(unknown)} (known: {', '.join(sorted(fields))})"
        )
    values: dict[str, Any] = {}
    for name in fields:
        where = f"[{section}] {name}"
        var = env_var_name(section, name)
        if var in env:
            values[name] = _coerce(_parse_env(env[var], hints[name]), hints[name], f"{where} (from ${var})")
        elif name in raw:
            values[name] = _coerce(raw[name], hints[name], where)
    try:
        obj = cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[{section}] {e}") from None
    return obj


def _parse_env(text: str, hint: Any) -> Any:
    """Environment values are strings; lists and tables may be given as JSON."""
    origin = typing.get_origin(hint)
    if origin in (list, tuple, dict) or hint in (list, tuple, dict):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return [s.strip() for s in text.split(",") if s.strip()]
    return text


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value == "" and type(None) in args):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        number: float | None = None
        try:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                number = float(value)
            elif isinstance(value, str):
                number = float(value)
        except (ValueError, OverflowError):
            pass
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        # TOML and float() accept inf and nan; no setting means anything with them (nan compares
        # false with every bound, so it would slip past the range checks).
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [
            value_i if item is Any else _coerce(value_i, item, f"{where}[{i}]")
            for i, value_i in enumerate(value)
        ]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    return value
