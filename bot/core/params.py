"""One parser for the flags every adapter accepts:

    a red fox in the snow --ar 3:2 --n 2 --seed 42 --steps 30 --guidance 6 --no blurry, text

`--model NAME` picks one of the models the inference servers offer; `--lora NAME[:WEIGHT]` (repeatable,
weight 1 when left out) applies a LoRA. This module checks their syntax (`model_request`); which names
exist, and which are allowed where, is `bot.core.model_choice`'s to say, since the model decides the
limits the other flags are checked against.

`--strength S` (0 < S <= 1) applies where a job starts from an image (an uploaded image, a remix):
how far the result may stray from it. `--no` takes everything up to the next flag. Options from a slash command (a mapping with keys
seed, steps, n, ar, guidance, negative, model, lora) override flags (a `lora` option adds to the
`--lora` flags). Errors name the flag and the bad value.
Em/en dashes are accepted for `--` because phones "correct" `--ar` into `—ar`.

What a flag may be and what it defaults to follow the model (`Limits`): the capabilities the
inference server reports (its model family's size multiple, default size, steps and guidance, what
guidance and negative prompts mean to it), within `[bot]`'s own settings. A flag the model can't
honour is refused here, with a message, before a job is queued.

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

from bot.backends.base import LoraSpec, ModelCapabilities
from bot.config import BotConfig
from bot.core.api import BadParameters
from bot.core.validate import first_bad_char

# Seeds are part of the API's contract (uint32, so every client can echo them), not a model property.
MAX_SEED = 2**32 - 1
# Images per job: what fits in one chat message (a server may allow fewer; see `Limits`).
MAX_N = 4
# Aspect ratios beyond 4:1 give strips a few latents tall at the embedded model's 64x64 size.
MAX_ASPECT = 4.0
# Used only when the backend doesn't report its model (the Hugging Face backend, the fake, a server
# not reachable yet): the project's server defaults for its embedded model, and the bot's own bound
# on an input image's side.
FALLBACK_BASE_SIZE = 64
FALLBACK_STEPS = 20
FALLBACK_MAX_STEPS = 150
FALLBACK_GUIDANCE = 7.5
FALLBACK_MAX_GUIDANCE = 30.0
FALLBACK_MULTIPLE = 8
FALLBACK_MAX_SIDE = 4096


@dataclass(frozen=True)
class Limits:
    """What a job may ask for and what it gets by default: the model's capabilities when the backend
    reports them, narrowed by `[bot]` where it sets its own limits; `[bot]` and the fallbacks above
    otherwise."""

    model: str  # for messages: "FLUX.1-schnell", or "the model"
    base_width: int  # --ar keeps about base_width x base_height pixels
    base_height: int
    size_multiple: int
    min_side: int
    max_side: int
    default_steps: int
    max_steps: int
    default_guidance: float
    max_guidance: float
    max_n: int
    max_prompt_chars: int
    guidance: str  # "cfg", "distilled" or "none" (see ModelCapabilities)
    negative_prompt: str  # "cfg" (needs guidance > 1) or "true_cfg"
    tasks: tuple[str, ...]

    @classmethod
    def of(cls, bot: BotConfig, model: ModelCapabilities | None) -> Limits:
        if model is None:
            base = bot.base_size or FALLBACK_BASE_SIZE
            max_steps = bot.max_steps or FALLBACK_MAX_STEPS
            return cls(
                model="the model",
                base_width=base,
                base_height=base,
                size_multiple=FALLBACK_MULTIPLE,
                min_side=FALLBACK_MULTIPLE,
                max_side=FALLBACK_MAX_SIDE,
                default_steps=min(bot.default_steps or FALLBACK_STEPS, max_steps),
                max_steps=max_steps,
                default_guidance=FALLBACK_GUIDANCE if bot.default_guidance is None else bot.default_guidance,
                max_guidance=FALLBACK_MAX_GUIDANCE,
                max_n=MAX_N,
                max_prompt_chars=bot.max_prompt_chars,
                guidance="cfg",
                negative_prompt="cfg",
                tasks=("txt2img", "img2img", "inpaint"),
            )
        max_steps = min(bot.max_steps or model.max_steps, model.max_steps)
        width, height = model.default_width, model.default_height
        if bot.base_size:  # the operator's choice of size, kept to the model's multiple
            width = height = max(
                model.size_multiple, round(bot.base_size / model.size_multiple) * model.size_multiple
            )
        guidance = model.default_guidance if bot.default_guidance is None else bot.default_guidance
        if model.guidance == "none":
            guidance = 0.0  # a [bot] default_guidance set for another model can't apply here
        return cls(
            model=model.label,
            base_width=width,
            base_height=height,
            size_multiple=model.size_multiple,
            min_side=model.min_side,
            max_side=model.max_side,
            default_steps=min(bot.default_steps or model.default_steps, max_steps),
            max_steps=max_steps,
            default_guidance=min(guidance, model.max_guidance),
            max_guidance=model.max_guidance,
            max_n=min(MAX_N, model.max_images),
            max_prompt_chars=min(bot.max_prompt_chars, model.max_prompt_chars),
            guidance=model.guidance,
            negative_prompt=model.negative_prompt,
            tasks=model.tasks,
        )

    def require_task(self, task: str, what: str) -> None:
        """Refuse a job the model can't do (an inpainting checkpoint asked for text-to-image)."""
        if task not in self.tasks:
            raise BadParameters(
                "task", f"{self.model} can't do {what}; it does {', '.join(self.tasks)}.", task
            )


FLAGS = ("seed", "steps", "n", "ar", "no", "guidance", "strength", "model", "lora")
# Flags that may be given more than once (each time one value).
REPEATABLE = ("lora",)
OPTION_ALIASES = {
    "negative": "no",
    "negative_prompt": "no",
    "aspect_ratio": "ar",
    "aspect": "ar",
    "loras": "lora",
}
# LoRAs per job: each one is merged into the model's weights on the server for that request, which
# costs memory and time per LoRA, and stacks of more than a few fight each other into noise; 4 keeps
# the common style + subject + detail combinations.
MAX_LORAS = 4
# LoRA weights: past +-2 a LoRA overwhelms the model (noise, burnt colours); a negative weight pushes
# away from the LoRA's style, which people use on purpose.
MIN_LORA_WEIGHT = -2.0
MAX_LORA_WEIGHT = 2.0
# Model and LoRA names as servers list them (Hub-style ids may have "/", versions have ".").
NAME_RE = re.compile(r"[\w][\w.+/-]{0,99}")

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
    strength: float | None = None  # --strength, where the caller allows it
    # The model and LoRAs, as resolved by `bot.core.model_choice` (None: the server's default model).
    model: str | None = None
    loras: tuple[LoraSpec, ...] = ()

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(self.seed + i for i in range(self.n))


def split_flags(text: str) -> tuple[str, dict[str, str]]:
    """Return the prompt text and the raw flag values (strings). Unknown flags are errors."""
    if "--" not in text and "\u2014" not in text and "\u2013" not in text:
        return " ".join(text.split()), {}  # no flag can start here: no regex search
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
        if name in flags and name not in REPEATABLE:
            raise BadParameters(name, f"--{name} is given twice.", value)
        if name != "no" and (not value or len(value.split()) > 1):
            # A value with spaces after a non-"no" flag means prompt text after the flags: refuse
            # rather than silently dropping or merging it.
            raise BadParameters(
                name, f"--{name} needs one value (got {value!r}); put the prompt before the flags.", value
            )
        # A repeated flag's values are kept space-separated: each is one word (checked above).
        flags[name] = f"{flags[name]} {value}" if name in flags else value
    return " ".join(prompt.split()), flags


@dataclass(frozen=True)
class ModelRequest:
    """`--model` and `--lora` as the user gave them (syntax checked; existence not yet)."""

    model: str | None = None
    loras: tuple[LoraSpec, ...] = ()


def model_request(text: str, options: Mapping[str, Any] | None) -> ModelRequest:
    """The `--model` and `--lora` flags of `text` and the `model`/`lora` options: names well formed,
    weights in range, at most MAX_LORAS, none twice. BadParameters naming the flag otherwise."""
    _, raw = split_flags("" if not isinstance(text, str) else text)
    model = raw.get("model")
    lora_words = raw.get("lora", "").split()
    for key, value in (options or {}).items() if isinstance(options, Mapping) else ():
        name = OPTION_ALIASES.get(key, key) if isinstance(key, str) else None
        if name in ("model", "lora") and value is not None and not isinstance(value, str):
            raise BadParameters(key, f"Option {key!r} must be a name, got {type(value).__name__}.", value)
        if not isinstance(value, str) or not value.strip():
            continue  # empty values are no choice; the other options are parse_prompt's
        if name == "model":
            model = value.strip()
        elif name == "lora":
            lora_words += value.replace(",", " ").split()
    if model is not None:
        _check_chars("model", model, "--model")
        if not NAME_RE.fullmatch(model):
            raise BadParameters(
                "model", f"--model needs a model name (see /models), got {model[:60]!r}.", model
            )
    loras: list[LoraSpec] = []
    for word in lora_words:
        lora = parse_lora(word)
        if any(seen.name.casefold() == lora.name.casefold() for seen in loras):
            raise BadParameters("lora", f"--lora {lora.name} is given twice.", word)
        loras.append(lora)
    if len(loras) > MAX_LORAS:
        raise BadParameters("lora", f"At most {MAX_LORAS} LoRAs per job (got {len(loras)}).", len(loras))
    return ModelRequest(model, tuple(loras))


def parse_lora(word: str) -> LoraSpec:
    """`NAME` (weight 1) or `NAME:WEIGHT`."""
    _check_chars("lora", word, "--lora")
    name, colon, weight_text = word.rpartition(":") if ":" in word else (word, "", "")
    if not NAME_RE.fullmatch(name) or (colon and not weight_text):
        raise BadParameters(
            "lora",
            f"--lora must look like NAME or NAME:WEIGHT (for example detail:0.8), got {word[:60]!r}.",
            word,
        )
    if not colon:
        return LoraSpec(name, 1.0)
    try:
        weight = float(weight_text)
    except ValueError:
        weight = math.nan
    if not (math.isfinite(weight) and MIN_LORA_WEIGHT <= weight <= MAX_LORA_WEIGHT):
        raise BadParameters(
            "lora",
            f"--lora {name}: the weight must be a number from {MIN_LORA_WEIGHT:g} to {MAX_LORA_WEIGHT:g}, "
            f"got {weight_text[:20]!r}.",
            word,
        )
    return LoraSpec(name, weight)


def _check_chars(field: str, value: str, what: str) -> None:
    bad = first_bad_char(value)
    if bad is not None:
        raise BadParameters(field, f"{what} contains {bad}, which cannot be used.", value)


def size_for_aspect(ar_w: float, ar_h: float, limits: Limits) -> tuple[int, int]:
    """Width and height at ratio ar_w:ar_h keeping about the model's default number of pixels, in
    multiples of its size multiple and within its smallest and largest side (scaled down as a
    whole, not cropped to a square, when a side would pass the largest)."""
    m = limits.size_multiple
    ratio = ar_w / ar_h
    pixels = limits.base_width * limits.base_height
    width, height = math.sqrt(pixels * ratio), math.sqrt(pixels / ratio)
    scale = min(1.0, limits.max_side / max(width, height))
    scale = max(scale, limits.min_side / min(width, height))

    def snap(side: float) -> int:
        return min(limits.max_side, max(limits.min_side, m, round(side * scale / m) * m))

    return snap(width), snap(height)


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
    limits: Limits | None = None,
    rng: random.Random | None = None,
    require_prompt: bool = True,
    allow_strength: bool = False,
    chosen: ModelRequest | None = None,
) -> ParsedPrompt:
    """Parse `text` (prompt + flags) and `options` into resolved parameters: within `limits` (the
    model's, see `Limits.of`; `[bot]`'s alone when None), with its defaults. `--strength` is
    refused unless `allow_strength` (the job starts from an image). `chosen`: the model and LoRAs
    `bot.core.model_choice` resolved, kept in the result (None: the server's default)."""
    limits = limits or Limits.of(config, None)
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
        if name in ("model", "lora"):
            continue  # model_request's (their syntax) and model_choice's (their existence)
        raw[name] = value
    if require_prompt and not prompt:
        raise BadParameters("prompt", "The prompt is empty: describe the image you want.")
    if len(prompt) > limits.max_prompt_chars:
        raise BadParameters(
            "prompt", f"The prompt is too long ({len(prompt)} characters; at most {limits.max_prompt_chars})."
        )
    negative = " ".join(str(raw.get("no", "")).split())
    if len(negative) > limits.max_prompt_chars:
        raise BadParameters(
            "no", f"The --no text is too long (at most {limits.max_prompt_chars} characters)."
        )
    n = _int("n", raw["n"], 1, limits.max_n) if "n" in raw else min(config.default_n, limits.max_n)
    steps = _int("steps", raw["steps"], 1, limits.max_steps) if "steps" in raw else limits.default_steps
    if "guidance" in raw:
        guidance = _float("guidance", raw["guidance"], 0.0, limits.max_guidance)
        if limits.guidance == "none" and guidance != 0:
            raise BadParameters(
                "guidance",
                f"{limits.model} takes no guidance (it is guidance-distilled): leave out --guidance.",
                raw["guidance"],
            )
    else:
        guidance = limits.default_guidance
    if negative and limits.negative_prompt == "cfg" and guidance <= 1:
        # The negative prompt acts through classifier-free guidance, which is off at guidance <= 1.
        raise BadParameters(
            "no",
            f"--no needs --guidance above 1 on {limits.model} (the negative prompt works through "
            f"guidance); the guidance is {guidance:g}.",
            negative,
        )
    # image i uses seed + i, so the base seed leaves room for n - 1 more.
    if "seed" in raw:
        seed = _int("seed", raw["seed"], 0, MAX_SEED - (n - 1))
    else:
        seed = (rng or random.SystemRandom()).randint(0, MAX_SEED - (MAX_N - 1))
    if "ar" in raw:
        w, h = parse_aspect(raw["ar"])
        width, height = size_for_aspect(w, h, limits)
        aspect: str | None = f"{w}:{h}"
    else:
        width, height = limits.base_width, limits.base_height
        aspect = None
    strength: float | None = None
    if "strength" in raw:
        if not allow_strength:
            raise BadParameters(
                "strength",
                "--strength only applies when you start from an image: attach one to /imagine "
                "(or use Remix on a result).",
                raw["strength"],
            )
        strength = _float("strength", raw["strength"], 0.0, 1.0)
        if strength == 0.0:
            raise BadParameters(
                "strength",
                "--strength must be above 0 (0 would return the image unchanged).",
                raw["strength"],
            )
    model, loras = (chosen.model, chosen.loras) if chosen is not None else (None, ())
    return ParsedPrompt(
        prompt, negative, seed, steps, n, guidance, width, height, aspect, strength, model, loras
    )


def new_seed(n: int, rng: random.Random | None = None) -> int:
    return (rng or random.SystemRandom()).randint(0, MAX_SEED - (n - 1))
