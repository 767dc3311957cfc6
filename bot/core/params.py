"""One parser for the flags every adapter accepts:

    a red fox in the snow --ar 3:2 --n 2 --seed 42 --steps 30 --guidance 6 --no blurry, text

`--no` takes everything up to the next flag. Options from a slash command (a mapping with keys
seed, steps, n, ar, guidance, negative) override flags. Errors name the flag and the bad value.
Em/en dashes are accepted for `--` because phones "correct" `--ar` into `—ar`.

Every way out is a `ParsedPrompt` or `BadParameters`: text the database could not store (NUL, lone
surrogates, other control characters) is refused naming the flag or option it came in.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bot.config import BotConfig
from bot.core.api import BadParameters
from bot.core.validate import first_bad_char

MAX_SEED = 2**32 - 1  # the inference server's seed range (a uint32 torch generator seed)
MAX_N = 4  # images per job: the server's per-request limit, and what fits in one chat message
MIN_GUIDANCE, MAX_GUIDANCE = 0.0, 30.0  # the server's accepted range
# Aspect ratios beyond 4:1 give strips a few latents tall at the embedded model's 64x64 size.
MAX_ASPECT = 4.0

FLAGS = ("seed", "steps", "n", "ar", "no", "guidance")
OPTION_ALIASES = {"negative": "no", "negative_prompt": "no", "aspect_ratio": "ar", "aspect": "ar"}

_FLAG_RE = re.compile(r"(?:(?<=\s)|^)(?:--|\u2014|\u2013)([A-Za-z][\w-]*)")


@dataclass(frozen=True)
class ParsedPrompt:
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    n: int
    guidance: float
    width: int
    height: int
    aspect_ratio: str | None

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(self.seed + i for i in range(self.n))


def split_flags(text: str) -> tuple[str, dict[str, str]]:
    """Return the prompt text and the raw flag values (strings). Unknown flags are errors."""
    matches = list(_FLAG_RE.finditer(text))
    prompt = text[: matches[0].start()] if matches else text
    flags: dict[str, str] = {}
    for i, m in enumerate(matches):
        name = m.group(1).lower()
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        value = text[m.end() : end].strip()
        if name not in FLAGS:
            raise BadParameters(
                name, f"Unknown flag --{name}. Known flags: {', '.join('--' + f for f in FLAGS)}.", name
            )
        if name in flags:
            raise BadParameters(name, f"--{name} is given twice.", value)
        if name != "no" and (not value or len(value.split()) > 1):
            # A value with spaces after a non-"no" flag means prompt text after the flags: refuse
            # rather than silently dropping or merging it.
            raise BadParameters(
                name, f"--{name} needs one value (got {value!r}); put the prompt before the flags.", value
            )
        flags[name] = value
    return " ".join(prompt.split()), flags


def _check_chars(field: str, value: str, what: str) -> None:
    bad = first_bad_char(value)
    if bad is not None:
        raise BadParameters(field, f"{what} contains {bad}, which cannot be used.", value)


def size_for_aspect(ar_w: float, ar_h: float, base_size: int) -> tuple[int, int]:
    """Width and height, multiples of 8, keeping about base_size**2 pixels at ratio ar_w:ar_h."""
    pixels = base_size * base_size
    ratio = ar_w / ar_h
    width = max(8, round(math.sqrt(pixels * ratio) / 8) * 8)
    height = max(8, round(math.sqrt(pixels / ratio) / 8) * 8)
    return width, height


def _int(name: str, raw: Any, lo: int, hi: int) -> int:
    if isinstance(raw, bool):
        raise BadParameters(name, f"--{name} must be a whole number from {lo} to {hi}, got {raw!r}.", raw)
    try:
        value = int(raw) if isinstance(raw, int) else int(str(raw).strip())
    except ValueError:
        raise BadParameters(
            name, f"--{name} must be a whole number from {lo} to {hi}, got {raw!r}.", raw
        ) from None
    if not lo <= value <= hi:
        raise BadParameters(name, f"--{name} must be from {lo} to {hi}, got {value}.", raw)
    return value


def _float(name: str, raw: Any, lo: float, hi: float) -> float:
    try:
        value = (
            float(raw)
            if isinstance(raw, (int, float)) and not isinstance(raw, bool)
            else float(str(raw).strip())
        )
    except (ValueError, OverflowError):  # OverflowError: an int too large for a float
        raise BadParameters(
            name, f"--{name} must be a number from {lo:g} to {hi:g}, got {raw!r}.", raw
        ) from None
    if not (math.isfinite(value) and lo <= value <= hi):
        raise BadParameters(name, f"--{name} must be from {lo:g} to {hi:g}, got {raw!r}.", raw)
    return value


def parse_aspect(raw: Any) -> tuple[int, int]:
    text = str(raw).strip()
    m = re.fullmatch(r"(\d{1,4})\s*[:x/]\s*(\d{1,4})", text)
    if not m or int(m.group(1)) == 0 or int(m.group(2)) == 0:
        raise BadParameters("ar", f"--ar must look like W:H (for example 3:2), got {raw!r}.", raw)
    w, h = int(m.group(1)), int(m.group(2))
    if max(w / h, h / w) > MAX_ASPECT:
        raise BadParameters("ar", f"--ar must be between 1:4 and 4:1, got {text}.", raw)
    return w, h


def parse_prompt(
    text: str,
    options: Mapping[str, Any] | None,
    config: BotConfig,
    *,
    rng: random.Random | None = None,
    require_prompt: bool = True,
) -> ParsedPrompt:
    """Parse `text` (prompt + flags) and `options` into resolved parameters (config defaults)."""
    text = "" if text is None else text
    if not isinstance(text, str):
        raise BadParameters("prompt", f"The prompt must be text, got {type(text).__name__}.")
    if len(text) > config.max_prompt_chars * 2:
        raise BadParameters("prompt", f"The prompt is too long (over {config.max_prompt_chars} characters).")
    if options is not None and not isinstance(options, Mapping):
        raise BadParameters("options", f"Options must be a mapping, got {type(options).__name__}.")
    prompt, raw = split_flags(text)
    _check_chars("prompt", prompt, "The prompt")
    for name, value in raw.items():
        _check_chars(name, value, f"--{name}")
    for key, value in (options or {}).items():
        name = OPTION_ALIASES.get(key, key) if isinstance(key, str) else None
        if name != "prompt" and name not in FLAGS:
            # The field is the name as given, or "options" when there is no name to point at.
            field = key if isinstance(key, str) and key.strip() else "options"
            raise BadParameters(field, f"Unknown option {str(key)[:40]!r}. Known: {', '.join(FLAGS)}.", key)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise BadParameters(key, f"Option {key!r} must be a number or text, got {type(value).__name__}.")
        if isinstance(value, str):
            if len(value) > config.max_prompt_chars * 2:
                raise BadParameters(
                    key, f"Option {key!r} is too long (over {config.max_prompt_chars} characters)."
                )
            _check_chars(key, value, f"Option {key!r}")
        if name == "prompt":
            prompt = " ".join(str(value).split())
            continue
        raw[name] = value
    if require_prompt and not prompt:
        raise BadParameters("prompt", "The prompt is empty: describe the image you want.")
    if len(prompt) > config.max_prompt_chars:
        raise BadParameters(
            "prompt", f"The prompt is too long ({len(prompt)} characters; at most {config.max_prompt_chars})."
        )
    negative = " ".join(str(raw.get("no", "")).split())
    if len(negative) > config.max_prompt_chars:
        raise BadParameters(
            "no", f"The --no text is too long (at most {config.max_prompt_chars} characters)."
        )
    n = _int("n", raw["n"], 1, MAX_N) if "n" in raw else config.default_n
    steps = _int("steps", raw["steps"], 1, config.max_steps) if "steps" in raw else config.default_steps
    guidance = (
        _float("guidance", raw["guidance"], MIN_GUIDANCE, MAX_GUIDANCE)
        if "guidance" in raw
        else config.default_guidance
    )
    # image i uses seed + i, so the base seed leaves room for n - 1 more.
    if "seed" in raw:
        seed = _int("seed", raw["seed"], 0, MAX_SEED - (n - 1))
    else:
        seed = (rng or random.SystemRandom()).randint(0, MAX_SEED - (MAX_N - 1))
    if "ar" in raw:
        w, h = parse_aspect(raw["ar"])
        width, height = size_for_aspect(w, h, config.base_size)
        aspect: str | None = f"{w}:{h}"
    else:
        width = height = config.base_size
        aspect = None
    return ParsedPrompt(prompt, negative, seed, steps, n, guidance, width, height, aspect)


def new_seed(n: int, rng: random.Random | None = None) -> int:
    return (rng or random.SystemRandom()).randint(0, MAX_SEED - (n - 1))
