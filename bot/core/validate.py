"""Checks on every value that enters the core from an adapter, before it reaches the database.

The database refuses some text outright: PostgreSQL cannot hold NUL in a text column, and neither
SQLite nor PostgreSQL can store a lone UTF-16 surrogate ("\\ud800" from a JSON escape), which has no
UTF-8 encoding. Columns are bounded too (`VARCHAR(64)` on PostgreSQL refuses longer ids, SQLite
would keep them). Everything is checked here and refused with `BadParameters` naming the field, so a
driver error never stands in for an answer to the user.

Three kinds of values:
- free text the user wrote (prompts, a ban reason): no control characters except tab and newlines,
  no surrogates, bounded length;
- ids from the platform or the adapter (user, guild, channel and message ids, idempotency keys):
  non-empty, no whitespace or control characters, bounded by their column;
- labels (display names): shown back, never decided on, so they are cleaned instead of refused, and a
  user with an odd name is not locked out.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Mapping
from typing import Any

from bot.core.api import Actor, BadParameters, Place

# Column sizes of bot.core.models, which these bounds must not exceed.
MAX_PLATFORM_CHARS = 32  # users.platform, jobs.platform
MAX_ID_CHARS = 64  # users.platform_user_id, jobs.guild_id / channel_id, quota_limits.scope_id
MAX_MESSAGE_ID_CHARS = 100  # jobs.result_message_id / result_channel_id
MAX_DISPLAY_NAME_CHARS = 200  # users.display_name
MAX_REASON_CHARS = 500  # users.ban_reason
# Idempotency keys are stored namespaced by platform ("discord:<key>") in jobs.idempotency_key
# (VARCHAR(200)): the platform's 32 characters and the colon fit beside 150.
MAX_KEY_CHARS = 150
# An adapter's delivery mapping (channel, thread, interaction token...) is a few hundred bytes; 16 KiB
# leaves room for any platform while keeping a job row small.
MAX_DELIVERY_BYTES = 16 * 1024
# Job ids are BIGINT on PostgreSQL: a larger number is no job, not a driver overflow.
MAX_JOB_ID = 2**63 - 1

_ALLOWED_CONTROLS = frozenset("\t\n\r")


# Every character the loop below may refuse (control characters are \x00-\x1f and \x7f-\x9f,
# surrogates \ud800-\udfff; `\s` is `str.isspace`): one regex search clears the usual text, where
# the loop's per-character Unicode lookups cost a submission more than its database work.
_MAYBE_BAD = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_MAYBE_BAD_OR_SPACE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\\s]")
# The ids platforms send (Discord snowflakes, Slack's U0123ABC, our own keys): printable ASCII
# without spaces, which `ident` accepts on one match instead of its checks one by one.
_PLAIN_ID = re.compile("[!-~]+")


def first_bad_char(text: str, *, allow_space: bool = True) -> str | None:
    """The first character that may not be stored (a control character, a lone surrogate, or
    whitespace where `allow_space` is False), described for an error message; None if all is well."""
    if (_MAYBE_BAD if allow_space else _MAYBE_BAD_OR_SPACE).search(text) is None:
        return None
    for i, ch in enumerate(text):
        category = unicodedata.category(ch)
        if category == "Cs":
            return f"a lone surrogate U+{ord(ch):04X} at position {i + 1}"
        if category == "Cc" and not (allow_space and ch in _ALLOWED_CONTROLS):
            name = "a NUL byte" if ch == "\x00" else f"the control character U+{ord(ch):04X}"
            return f"{name} at position {i + 1}"
        if not allow_space and ch.isspace():
            return f"a space at position {i + 1}"
    return None


def text(field: str, value: Any, *, max_chars: int, what: str | None = None) -> str:
    """Free text: a str without control characters (tab and newlines aside) or surrogates."""
    what = what or f"The {field}"
    if not isinstance(value, str):
        raise BadParameters(field, f"{what} must be text, got {type(value).__name__}.", value)
    if len(value) > max_chars:
        raise BadParameters(field, f"{what} is too long ({len(value)} characters; at most {max_chars}).")
    bad = first_bad_char(value)
    if bad is not None:
        raise BadParameters(field, f"{what} contains {bad}, which cannot be used.", value)
    return value


def ident(field: str, value: Any, *, max_chars: int = MAX_ID_CHARS) -> str:
    """An id: non-empty text without whitespace or control characters, at most `max_chars`."""
    if type(value) is str and len(value) <= max_chars and _PLAIN_ID.fullmatch(value) is not None:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # platforms' numeric ids (Discord snowflakes) are ids too
    if not isinstance(value, str) or not value:
        raise BadParameters(field, f"The {field} must be a non-empty id, got {value!r}.", value)
    if len(value) > max_chars:
        raise BadParameters(
            field, f"The {field} is too long ({len(value)} characters; at most {max_chars}).", value[:80]
        )
    bad = first_bad_char(value, allow_space=False)
    if bad is not None:
        raise BadParameters(field, f"The {field} contains {bad}.", value)
    return value


def optional_ident(field: str, value: Any, *, max_chars: int = MAX_ID_CHARS) -> str | None:
    return None if value is None else ident(field, value, max_chars=max_chars)


def label(value: Any, *, max_chars: int) -> str:
    """A display label, cleaned: control characters and surrogates dropped, spaces collapsed, cut to
    `max_chars`."""
    if not isinstance(value, str):
        return ""
    kept = value
    if _MAYBE_BAD.search(value) is not None:  # else every character is kept: no lookup per character
        kept = "".join(ch for ch in value if unicodedata.category(ch) not in ("Cc", "Cs"))
    return " ".join(kept.split())[:max_chars]


def job_id(value: Any, field: str = "job") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_JOB_ID:
        raise BadParameters(field, f"A job id is a positive whole number, got {value!r}.", value)
    return value


def idempotency_key(value: Any) -> str:
    return ident("idempotency_key", value, max_chars=MAX_KEY_CHARS)


def job_ref(by_id: Any, by_message: Any) -> tuple[int | None, str | None]:
    """A job given by its id or by the message showing its result: exactly one of the two."""
    if (by_id is None) == (by_message is None):
        raise BadParameters("job", "Give a job id or a result message id (exactly one).")
    if by_id is not None:
        return job_id(by_id), None
    return None, ident("message", by_message, max_chars=MAX_MESSAGE_ID_CHARS)


def job_refs(by_id: Any, by_message: Any) -> tuple[int | None, str | None]:
    """A job given by its id, by the message showing its result, or both (a button carries the job
    id and sits on the message): at least one of the two."""
    if by_id is None and by_message is None:
        raise BadParameters("job", "Give a job id or a result message id.")
    return (
        None if by_id is None else job_id(by_id),
        None if by_message is None else ident("message", by_message, max_chars=MAX_MESSAGE_ID_CHARS),
    )


def count(field: str, value: Any, lo: int, hi: int) -> int:
    """A whole number asked for by an adapter (a page size, an image index), clamped to [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadParameters(field, f"The {field} must be a whole number, got {value!r}.", value)
    return max(lo, min(int(value), hi))


# A Discord member has at most 250 roles (the guild's maximum).
MAX_ROLES = 250


def actor(value: Actor) -> Actor:
    if not isinstance(value, Actor):
        raise TypeError(f"expected an Actor, got {type(value).__name__}")
    platform = ident("platform", value.platform, max_chars=MAX_PLATFORM_CHARS)
    user_id = ident("user", value.user_id)
    name = label(value.display_name, max_chars=MAX_DISPLAY_NAME_CHARS)
    roles = value.role_ids
    if not isinstance(roles, (tuple, list)) or len(roles) > MAX_ROLES:
        raise BadParameters("roles", f"At most {MAX_ROLES} role ids, as a list.", type(roles).__name__)
    roles = tuple(ident("role", r) for r in roles)
    if (platform, user_id, name, roles) == (
        value.platform,
        value.user_id,
        value.display_name,
        value.role_ids,
    ):
        return value
    return Actor(platform, user_id, name, bool(value.is_admin), roles)


def place(value: Place) -> Place:
    if not isinstance(value, Place):
        raise TypeError(f"expected a Place, got {type(value).__name__}")
    ident("platform", value.platform, max_chars=MAX_PLATFORM_CHARS)
    optional_ident("guild", value.guild_id)
    optional_ident("channel", value.channel_id)
    return value


def actor_and_place(who: Actor, where: Place) -> tuple[Actor, Place]:
    """The actor and place of a request, checked (ids storable, display name cleaned), on one
    platform."""
    who, where = actor(who), place(where)
    if where.platform != who.platform:
        raise BadParameters(
            "place", f"The place is on {where.platform!r} but the actor on {who.platform!r}.", where
        )
    return who, where


def delivery(value: Mapping[str, Any] | None) -> dict[str, Any]:
    """The adapter's delivery mapping: JSON of plain values whose text can be stored, bounded."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise BadParameters("delivery", "The delivery must be a mapping.", type(value).__name__)

    def check(v: Any, where: str) -> None:
        if isinstance(v, str):
            text("delivery", v, max_chars=MAX_DELIVERY_BYTES, what=f"The delivery value {where!r}")
        elif isinstance(v, Mapping):
            for k, item in v.items():
                if not isinstance(k, str):
                    raise BadParameters("delivery", f"Delivery keys must be text, got {k!r}.", k)
                check(k, f"{where}.{k}" if where else k)
                check(item, f"{where}.{k}" if where else k)
        elif isinstance(v, (list, tuple)):
            for i, item in enumerate(v):
                check(item, f"{where}[{i}]")
        elif isinstance(v, float) and not math.isfinite(v):
            raise BadParameters("delivery", f"The delivery value {where!r} is not a finite number.", v)
        elif not (v is None or isinstance(v, (bool, int, float))):
            raise BadParameters(
                "delivery", f"The delivery value {where!r} is a {type(v).__name__}, not JSON.", where
            )

    check(value, "")
    size = len(json.dumps(value, ensure_ascii=False).encode("utf-8"))
    if size > MAX_DELIVERY_BYTES:
        raise BadParameters(
            "delivery", f"The delivery mapping is {size} bytes; at most {MAX_DELIVERY_BYTES}."
        )
    return dict(value)
