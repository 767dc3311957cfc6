"""The shared flag parser: every adapter gets the same syntax and the same errors."""

import random

import pytest

from bot.config import BotConfig
from bot.core.api import BadParameters
from bot.core.params import MAX_SEED, Limits, parse_prompt, size_for_aspect, split_flags

CFG = BotConfig()


def parse(text, options=None, **cfg):
    return parse_prompt(text, options, BotConfig(**cfg) if cfg else CFG, rng=random.Random(0))


def test_plain_prompt_takes_config_defaults():
    p = parse("a red fox in the snow")
    assert (p.prompt, p.negative_prompt, p.n, p.steps, p.guidance) == (
        "a red fox in the snow",
        "",
        1,
        20,
        7.5,
    )
    assert (p.width, p.height, p.aspect_ratio) == (64, 64, None)
    assert 0 <= p.seed <= MAX_SEED - 3


def test_every_flag():
    p = parse("a fox --seed 42 --steps 30 --n 3 --ar 3:2 --guidance 6.5 --no blurry, low quality")
    assert p.prompt == "a fox"
    assert p.negative_prompt == "blurry, low quality"
    assert (p.seed, p.steps, p.n, p.guidance) == (42, 30, 3, 6.5)
    assert p.seeds == (42, 43, 44)  # image i uses seed + i
    assert p.aspect_ratio == "3:2"
    assert (p.width, p.height) == (80, 56)
    assert p.width % 8 == 0 and p.height % 8 == 0


def test_no_in_the_middle_stops_at_next_flag_and_dashes_from_phones():
    p = parse("castle \u2014no fog, rain --n 2")
    assert p.negative_prompt == "fog, rain" and p.n == 2


def test_options_override_flags():
    p = parse("a fox --steps 10 --n 1", {"steps": 25, "n": "2", "negative": "text", "seed": None})
    assert (p.steps, p.n, p.negative_prompt) == (25, 2, "text")


@pytest.mark.parametrize(
    ("text", "field", "needle"),
    [
        ("fox --steps abc", "steps", "'abc'"),
        ("fox --steps 0", "steps", "got 0"),
        ("fox --steps 151", "steps", "151"),
        ("fox --n 5", "n", "got 5"),
        ("fox --n 0", "n", "got 0"),
        ("fox --ar 3-2", "ar", "'3-2'"),
        ("fox --ar 9:1", "ar", "9:1"),
        ("fox --ar 0:1", "ar", "'0:1'"),
        ("fox --guidance 31", "guidance", "31"),
        ("fox --guidance nan", "guidance", "nan"),
        ("fox --seed -1", "seed", "got -1"),
        (f"fox --seed {MAX_SEED}", "seed", str(MAX_SEED)),  # n=1 fits; checked with n=2 below
        ("fox --size 3", "size", "--size"),
        ("fox --n 2 --n 3", "n", "twice"),
        ("fox --n 2 a cat", "n", "'2 a cat'"),
        ("--n 2", "prompt", "empty"),
    ],
)
def test_errors_name_the_flag_and_value(text, field, needle):
    if field == "seed" and str(MAX_SEED) in text:
        assert parse(text).seed == MAX_SEED
        with pytest.raises(BadParameters) as err:
            parse(text + " --n 2")
        assert err.value.field == "seed" and str(MAX_SEED) in err.value.message
        return
    with pytest.raises(BadParameters) as err:
        parse(text)
    assert err.value.field == field
    assert needle in err.value.message


def test_max_steps_from_config_and_unknown_option():
    with pytest.raises(BadParameters) as err:
        parse("fox --steps 60", max_steps=50)
    assert "from 1 to 50" in err.value.message
    with pytest.raises(BadParameters) as err:
        parse("fox", {"sampler": "ddim"})
    assert err.value.field == "sampler"


def test_prompt_too_long():
    with pytest.raises(BadParameters) as err:
        parse("x" * 1001)
    assert err.value.field == "prompt" and "1001" in err.value.message


@pytest.mark.parametrize(
    ("ar", "base", "expected"),
    [
        ((1, 1), 64, (64, 64)),
        ((3, 2), 64, (80, 56)),
        ((2, 3), 64, (56, 80)),
        ((16, 9), 512, (680, 384)),
        ((4, 1), 64, (128, 32)),
    ],
)
def test_aspect_sizes_keep_pixels_and_multiples_of_8(ar, base, expected):
    w, h = size_for_aspect(*ar, Limits.of(BotConfig(base_size=base), None))
    assert (w, h) == expected
    assert abs(w * h - base * base) / (base * base) < 0.15


def test_flag_like_words_inside_prompt_are_not_flags():
    prompt, flags = split_flags("a well-known fox--cute")
    assert prompt == "a well-known fox--cute" and flags == {}


# -- flags follow the model (the capabilities the inference server reports) --------------------------


def capabilities(**changes):
    from dataclasses import replace

    from bot.backends.base import ModelCapabilities

    flux_dev = ModelCapabilities(
        family="flux-dev",
        label="FLUX.1-dev",
        tasks=("txt2img", "img2img", "inpaint"),
        size_multiple=16,
        default_width=1024,
        default_height=1024,
        min_side=16,
        max_side=2048,
        default_steps=28,
        max_steps=150,
        default_guidance=3.5,
        max_guidance=30.0,
        guidance="distilled",
        negative_prompt="true_cfg",
        max_images=4,
        max_prompt_chars=1000,
    )
    return replace(flux_dev, **changes)


def parse_for(text, model, **cfg):
    config = BotConfig(**cfg)
    return parse_prompt(text, None, config, limits=Limits.of(config, model), rng=random.Random(0))


def test_defaults_and_ar_follow_the_model():
    p = parse_for("a fox", capabilities())
    assert (p.width, p.height, p.steps, p.guidance) == (1024, 1024, 28, 3.5)
    # 3:2 around 1024x1024 in multiples of 16 (in multiples of 8 it would be 1256x840).
    p = parse_for("a fox --ar 3:2", capabilities())
    assert (p.width, p.height) == (1248, 832)
    assert p.width % 16 == 0 and p.height % 16 == 0


def test_ar_stays_within_the_largest_side_keeping_the_ratio():
    w, h = size_for_aspect(4, 1, Limits.of(BotConfig(), capabilities(max_side=1024)))
    assert (w, h) == (1024, 256)


def test_bot_settings_win_where_set_but_keep_the_model_multiple():
    p = parse_for("a fox --ar 1:1", capabilities(), base_size=520, default_steps=10, default_guidance=2.0)
    assert (p.width, p.height, p.steps, p.guidance) == (512, 512, 10, 2.0)  # 520 to a multiple of 16
    with pytest.raises(BadParameters) as e:
        parse_for("a fox --steps 120", capabilities(max_steps=100))
    assert e.value.field == "steps" and "100" in e.value.message


def test_guidance_on_a_model_without_guidance_is_refused_before_queueing():
    schnell = capabilities(label="FLUX.1-schnell", guidance="none", default_guidance=0.0, default_steps=4)
    assert parse_for("a fox", schnell).guidance == 0.0
    assert parse_for("a fox", schnell, default_guidance=7.5).guidance == 0.0
    with pytest.raises(BadParameters) as e:
        parse_for("a fox --guidance 5", schnell)
    assert e.value.field == "guidance" and "FLUX.1-schnell takes no guidance" in e.value.message


def test_negative_prompt_needs_guidance_above_1_with_cfg_and_not_with_true_cfg():
    sd = capabilities(label="Stable Diffusion XL", guidance="cfg", negative_prompt="cfg", size_multiple=8)
    with pytest.raises(BadParameters) as e:
        parse_for("a fox --guidance 1 --no blur", sd)
    assert e.value.field == "no" and "above 1" in e.value.message
    assert parse_for("a fox --guidance 5 --no blur", sd).negative_prompt == "blur"
    assert parse_for("a fox --guidance 1 --no blur", capabilities()).negative_prompt == "blur"


def test_n_is_capped_by_the_server():
    with pytest.raises(BadParameters) as e:
        parse_for("a fox --n 3", capabilities(max_images=2))
    assert e.value.field == "n"
