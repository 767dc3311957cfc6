"""The playground's pure parts: config validation, who is admin, commands, and the brush mask."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from bot.core.api import BadParameters
from bot.playground import adapter_status
from bot.playground.config import load_playground_config
from bot.playground.ui import Identity, mask_from_editor, parse_command, whole_number
from bot.settings import ConfigError


def test_loopback_by_default_and_exposing_needs_a_password():
    cfg = load_playground_config({}, {})
    assert (cfg.host, cfg.port, cfg.exposed) == ("127.0.0.1", 7860, False)
    with pytest.raises(ConfigError, match=r"\[playground\] host = '0.0.0.0'.*PLAYGROUND_PASSWORD"):
        load_playground_config({"playground": {"host": "0.0.0.0"}}, {})
    exposed = load_playground_config(
        {}, {"IMAGINE_PLAYGROUND_HOST": "0.0.0.0", "PLAYGROUND_PASSWORD": "s3cret"}
    )
    assert exposed.exposed


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"port": 70000}, r"\[playground\] port"),
        ({"history_limit": 0}, r"\[playground\] history_limit"),
        ({"local_user": "web:me"}, r"\[playground\] local_user"),
        ({"local_user": "x" * 65}, r"\[playground\] local_user"),  # a user id: 64 at most
        ({"local_user": "me\n"}, r"\[playground\] local_user"),
        ({"poll_interval_s": float("inf")}, r"\[playground\] poll_interval_s"),
        ({"colour": "red"}, r"\[playground\] unknown key\(s\): colour"),
    ],
)
def test_bad_config_names_the_key(section, message):
    with pytest.raises(ConfigError, match=message):
        load_playground_config({"playground": section}, {})


def test_adapter_status_is_on_unless_turned_off():
    on, why = adapter_status({})
    assert on and why.startswith("on:") and "loopback" in why
    on, why = adapter_status({"PLAYGROUND_PASSWORD": "x"})
    assert on and "password" in why
    assert adapter_status({"IMAGINE_PLAYGROUND_ENABLED": "false"}) == (
        False,
        "off: IMAGINE_PLAYGROUND_ENABLED is false",
    )


def test_local_user_is_admin_and_password_logins_are_checked():
    cfg = load_playground_config({"playground": {"admin_users": ["boss"]}}, {})
    local = Identity(cfg).actor(None)
    assert (local.platform, local.user_id, local.is_admin) == ("web", "local", True)

    ident = Identity(cfg, password="team-pw", admin_password="boss-pw")
    assert ident.check_login("alice", "team-pw")
    assert not ident.check_login("alice", "wrong")
    assert not ident.check_login("boss", "team-pw"), "admins need the admin password"
    assert ident.check_login("boss", "boss-pw")
    assert not ident.check_login("bad name!", "team-pw")
    assert not Identity(cfg, password="team-pw").check_login("boss", ""), "no admin password: no admin"

    class Req:
        username = "alice"

    alice = ident.actor(Req())  # type: ignore[arg-type]
    assert (alice.user_id, alice.is_admin) == ("alice", False)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"PLAYGROUND_PASSWORD": " "}, "PLAYGROUND_PASSWORD: is only whitespace"),
        ({"PLAYGROUND_PASSWORD": "\t\n "}, "PLAYGROUND_PASSWORD: is only whitespace"),
        (
            {"PLAYGROUND_PASSWORD": "pw", "PLAYGROUND_ADMIN_PASSWORD": "  "},
            "PLAYGROUND_ADMIN_PASSWORD: is only",
        ),
        ({"PLAYGROUND_PASSWORD": "same", "PLAYGROUND_ADMIN_PASSWORD": "same"}, "must differ"),
        ({"PLAYGROUND_PASSWORD": "x" * 2000}, "PLAYGROUND_PASSWORD: longer than 1024"),
        # os.environ decodes bytes that are not UTF-8 to lone surrogates (surrogateescape)
        ({"PLAYGROUND_PASSWORD": "caf\udce9"}, "PLAYGROUND_PASSWORD: is not valid UTF-8"),
    ],
)
def test_unusable_passwords_are_refused_at_start_up(env, needle):
    with pytest.raises(ConfigError, match=needle):
        load_playground_config({}, env)


def test_admin_users_must_be_login_names():
    with pytest.raises(ConfigError, match=r"\[playground\] admin_users: 'the boss' is not a login name"):
        load_playground_config({"playground": {"admin_users": ["the boss"]}}, {})


def test_password_check_compares_utf8_and_never_raises():
    cfg = load_playground_config({"playground": {"admin_users": ["boss"]}}, {})
    ident = Identity(cfg, password="pässwörd-ü 🔑", admin_password="Боссу")
    assert ident.check_login("alice", "pässwörd-ü 🔑")
    # The same password typed on a keyboard that sends decomposed accents (NFD).
    assert ident.check_login("alice", "pa\u0308sswo\u0308rd-u\u0308 🔑")
    assert ident.check_login("boss", "Боссу")
    for username, password in [
        ("alice", "wrong ü"),
        ("alice", " "),
        ("alice", ""),
        ("alice", "\ud800"),
        ("alice", "x" * 100_000),
        ("alice", None),
        ("alice", b"bytes"),
        ("alice\n", "pässwörd-ü 🔑"),  # a name with a newline is not the same user
        (None, "pässwörd-ü 🔑"),
        ("boss", "pässwörd-ü 🔑"),
    ]:
        assert not ident.check_login(username, password), (username, password)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [1.5, float("inf"), float("nan"), "ten", 1e300, [3], True])
def test_admin_numbers_must_be_whole(value):
    with pytest.raises(BadParameters) as err:
        whole_number(value, "limit")
    assert err.value.field == "limit"


def test_admin_numbers():
    assert [whole_number(v, "x") for v in (None, "", 3, 3.0, "7")] == [None, None, 3, 3, 7]


def test_commands():
    assert parse_command("a red fox --seed 3") == ("imagine", "a red fox --seed 3")
    assert parse_command("/imagine  a red fox") == ("imagine", "a red fox")
    assert parse_command("/QUOTA") == ("quota", "")
    assert parse_command("/help me") == ("help", "me")


def _png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def test_mask_is_white_where_the_brush_painted():
    background = Image.new("RGBA", (16, 8), (0, 0, 255, 255))
    layer = Image.new("RGBA", (16, 8), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (2, 2, 6, 5))  # a painted 4x3 rectangle
    image_png, mask_png = mask_from_editor({"background": background, "layers": [layer], "composite": None})
    image = Image.open(io.BytesIO(image_png))
    assert image.size == (16, 8) and image.mode == "RGB"
    assert image.getpixel((0, 0)) == (0, 0, 255), "the image is the background, not the painted composite"
    assert mask_png is not None
    mask = Image.open(io.BytesIO(mask_png))
    assert mask.mode == "L" and mask.size == (16, 8)
    assert mask.getpixel((3, 3)) == 255 and mask.getpixel((0, 0)) == 0 and mask.getpixel((6, 3)) == 0
    assert sum(1 for x in range(16) for y in range(8) if mask.getpixel((x, y))) == 12


def test_nothing_painted_means_no_mask_and_no_upload_is_refused():
    background = Image.new("RGBA", (8, 8), (0, 0, 255, 255))
    _, mask = mask_from_editor({"background": background, "layers": [Image.new("RGBA", (8, 8))]})
    assert mask is None
    with pytest.raises(Exception, match="Upload an image first"):
        mask_from_editor({"background": None, "layers": []})


def test_launcher_token_comes_from_env_then_file_then_is_made_once(tmp_path):
    import stat

    from bot.launcher import ensure_token

    token_file = tmp_path / "data" / ".inference_token"
    assert ensure_token({"INFERENCE_API_TOKEN": "given"}, token_file) == "environment"
    assert not token_file.exists()
    env: dict[str, str] = {}
    assert ensure_token(env, token_file) == f"{token_file} (new)"
    made = env["INFERENCE_API_TOKEN"]
    assert len(made) >= 32 and stat.S_IMODE(token_file.stat().st_mode) == 0o600
    again: dict[str, str] = {}
    assert ensure_token(again, token_file) == str(token_file) and again["INFERENCE_API_TOKEN"] == made


def test_procfile_runs_the_server_and_the_bot():
    from bot.launcher import read_procfile

    assert read_procfile() == {"server": "exec python -m inference_server", "bot": "exec python -m bot"}


def test_launcher_refuses_a_busy_port_and_a_missing_model_with_a_hint(tmp_path, monkeypatch, capsys):
    import socket

    from bot.launcher import main

    monkeypatch.chdir(tmp_path)
    for key in ("IMAGINE_CONFIG", "INFERENCE_API_TOKEN", "IMAGINE_BACKENDS_KIND"):
        monkeypatch.delenv(key, raising=False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setenv("IMAGINE_BACKENDS_KIND", "fake")
        monkeypatch.setenv("IMAGINE_PLAYGROUND_PORT", str(port))
        assert main(["--config", str(Path(__file__).resolve().parents[2] / "config.toml")]) == 2
    out = capsys.readouterr().out
    assert f"[playground] 127.0.0.1:{port} is in use" in out and "IMAGINE_PLAYGROUND_PORT" in out

    monkeypatch.setenv("IMAGINE_BACKENDS_KIND", "inference_server")
    monkeypatch.setenv("IMAGINE_MODEL_PATH", str(tmp_path / "no-such-model"))
    assert main(["--config", str(Path(__file__).resolve().parents[2] / "config.toml")]) == 2
    out = capsys.readouterr().out
    assert "cannot start the inference server" in out and "IMAGINE_BACKENDS_KIND=fake make run" in out
