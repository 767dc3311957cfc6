"""Moderation rules, content-addressed storage, and the typed config."""

import hashlib
import string
import unicodedata

import pytest

from bot.config import load_core_config
from bot.core.moderation import Moderator, normalize
from bot.core.storage import LocalImageStorage
from bot.settings import ConfigError


def test_moderation_is_case_and_accent_insensitive_on_whole_words():
    m = Moderator(["gore", "blood bath", "Crème"])
    assert m.check("A GÔRE scene").term == "gore"
    assert m.check("gore, lots").term == "gore"
    assert m.check("a Blood   Bath").term == "blood bath"
    assert m.check("creme brulee").term == "Crème"
    assert m.check("gorey details") is None  # whole words only
    assert m.check("a nice cat") is None
    assert m.check("gore").description == "banned term 'gore'"
    assert Moderator(["gore"], enabled=False).check("gore") is None


def test_an_ascii_prompt_is_normalized_as_the_unicode_path_would():
    """`normalize` skips Unicode decomposition for ASCII text (the usual prompt): same result."""

    def unicode_path(text: str) -> str:
        decomposed = unicodedata.normalize("NFKD", text.casefold())
        return " ".join("".join(ch for ch in decomposed if not unicodedata.combining(ch)).split())

    texts = [string.printable, "A  Lighthouse\tat DUSK\n--ar 16:9", "", "   ", "ß", "Crème GÔRE"]
    texts += [string.printable[i:] + string.printable[:i] for i in range(0, 100, 7)]
    for text in texts:
        assert normalize(text) == unicode_path(text), text


async def test_storage_is_content_addressed_and_idempotent(tmp_path):
    store = LocalImageStorage(tmp_path / "img")
    data = b"\x89PNG fake bytes"
    key = await store.put(data)
    assert key == hashlib.sha256(data).hexdigest()
    assert await store.put(data) == key
    assert await store.get(key) == data
    assert store.path_for(key) == tmp_path / "img" / key[:2] / f"{key}.png"
    assert [p.name for p in store.path_for(key).parent.iterdir()] == [f"{key}.png"]  # no temp files left
    with pytest.raises(KeyError):
        await store.get("0" * 64)
    with pytest.raises(KeyError):
        store.path_for("../../etc/passwd")


def test_repository_config_loads_and_database_url_precedence():
    cfg = load_core_config("config.toml", {})
    assert cfg.database_url == "sqlite+aiosqlite:///data/imagine.db"
    # Size, steps and guidance follow the model unless [bot] sets them (config.toml leaves them unset).
    assert cfg.bot.base_size is None and cfg.quotas.daily_limit >= 1
    cfg = load_core_config({"database": {"url": "postgres://u@h/db"}}, {})
    assert cfg.database_url == "postgresql+asyncpg://u@h/db"
    cfg = load_core_config({"database": {"url": "postgres://u@h/db"}}, {"DATABASE_URL": "sqlite:///x.db"})
    assert cfg.database_url == "sqlite+aiosqlite:///x.db"
    cfg = load_core_config({}, {"IMAGINE_QUOTAS_DAILY_LIMIT": "7", "IMAGINE_MODERATION_BANNED_TERMS": "a,b"})
    assert cfg.quotas.daily_limit == 7 and cfg.moderation.banned_terms == ("a", "b")


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"bot": {"base_size": 60}}, "[bot] base_size"),
        ({"bot": {"dispatch_concurrency": 0}}, "[bot] dispatch_concurrency"),
        ({"bot": {"nope": 1}}, "nope"),
        ({"quotas": {"daily_limit": "many"}}, "[quotas] daily_limit"),
        ({"quotas": {"reset_hour_utc": 24}}, "[quotas] reset_hour_utc"),
        ({"database": {"url": "mysql://x"}}, "[database] url"),
        ({"moderation": {"banned_terms": ["ok", " "]}}, "banned_terms[1]"),
        # Infinities, NaN and absurd sizes never reach the code that does arithmetic with them.
        ({"bot": {"lease_s": float("inf")}}, "[bot] lease_s"),
        ({"bot": {"retry_backoff_s": 1e30}}, "[bot] retry_backoff_s"),
        ({"bot": {"poll_interval_s": float("nan")}}, "[bot] poll_interval_s"),
        ({"bot": {"job_timeout_s": float("inf")}}, "[bot] job_timeout_s"),
        ({"bot": {"max_prompt_chars": 10**9}}, "[bot] max_prompt_chars"),
        ({"bot": {"max_upload_bytes": 2**40}}, "[bot] max_upload_bytes"),
        ({"bot": {"base_size": 8192}}, "[bot] base_size"),
        ({"database": {"sqlite_busy_timeout_s": float("inf")}}, "[database] sqlite_busy_timeout_s"),
        ({"storage": {"dir": " "}}, "[storage] dir"),
    ],
)
def test_config_errors_name_the_key(raw, needle):
    with pytest.raises(ConfigError) as err:
        load_core_config(raw, {})
    assert needle in str(err.value)
