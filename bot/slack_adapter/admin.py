"""`/imagine-admin` argument parsing: text in, a plain command out, or AdminUsage saying what's wrong."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Slack escapes mentions in slash commands (should_escape: true) as <@U123|name>; people also paste
# bare ids.
_MENTION = re.compile(r"^<@([UW][A-Z0-9]+)(?:\|[^>]*)?>$|^([UW][A-Z0-9]{2,})$")

# Channels as Slack escapes them in slash commands (<#C123|name>), or bare ids.
_CHANNEL = re.compile(r"^<#([CGD][A-Z0-9]+)(?:\|[^>]*)?>$|^([CGD][A-Z0-9]{2,})$")

# Bonus credits per grant, as the core's documented bound.
MAX_CREDITS = 10_000
# A daily limit, as the core's bound.
MAX_DAILY_LIMIT = 100_000


def _number(token: str) -> int | None:
    """A plain decimal number (ASCII digits, at most 9 of them), else None. str.isdigit() alone also
    takes "²" or "٣", which int() then refuses or reads unexpectedly."""
    if not token.isascii() or not token.isdigit() or len(token) > 9:
        return None
    return int(token)


class AdminUsage(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class AdminCommand:
    # usage | limit_user | limit_workspace | credits | reset | ban | unban | stats | help
    # | default_model | allow_models | allow_loras | channels | channel_defaults | private | settings
    action: str
    user_id: str | None = None
    number: int | None = None
    reason: str = ""
    names: tuple[str, ...] = ()  # models or LoRAs (empty: all; for default_model: the servers')
    channels: tuple[str, ...] = ()  # channel ids (`channels`: empty = everywhere; else the one meant)
    defaults: tuple[tuple[str, str], ...] = ()  # channel-defaults: (model|ar|steps, value)
    private: bool | None = None  # private: on / off / None (a channel: as the workspace)
    workspace: bool = False  # private: for the whole workspace


def _channel(token: str) -> str | None:
    m = _CHANNEL.match(token)
    return (m.group(1) or m.group(2)) if m else None


def _user(token: str | None, what: str) -> str:
    if token is None:
        raise AdminUsage(f"`{what}` needs a user: mention them, e.g. `{what} @alice`.")
    m = _MENTION.match(token)
    if not m:
        raise AdminUsage(f"`{token}` is not a user mention (write @name so Slack turns it into a mention).")
    return m.group(1) or m.group(2)


def _limit(token: str | None, what: str) -> int | None:
    if token is None:
        raise AdminUsage(f"`{what}` needs a daily limit: a number, or `none` to remove it.")
    if token.lower() in ("none", "default", "off"):
        return None
    number = _number(token)
    if number is None or number > MAX_DAILY_LIMIT:
        raise AdminUsage(
            f"daily limit must be a whole number from 0 to {MAX_DAILY_LIMIT} or `none`, got `{token[:20]}`."
        )
    return number


def parse(text: str) -> AdminCommand:
    words = text.split()
    if not words or words[0].lower() in ("help", "-h", "--help"):
        return AdminCommand("help")
    verb, args = words[0].lower(), words[1:]
    arg = args[0] if args else None
    if verb == "stats":
        return AdminCommand("stats")
    if verb in ("usage", "reset", "unban"):
        return AdminCommand(verb, user_id=_user(arg, verb))
    if verb == "ban":
        return AdminCommand("ban", user_id=_user(arg, verb), reason=" ".join(args[1:]))
    if verb == "credits":
        uid = _user(arg, verb)
        amount = args[1] if len(args) > 1 else ""
        number = _number(amount)
        if number is None or not 1 <= number <= MAX_CREDITS:
            raise AdminUsage(
                f"credits amount must be a number from 1 to {MAX_CREDITS}, got `{amount[:20] or 'nothing'}`."
            )
        return AdminCommand("credits", user_id=uid, number=number)
    if verb in ("limits", "limit"):
        if arg is not None and arg.lower() in ("workspace", "team", "guild"):
            return AdminCommand(
                "limit_workspace", number=_limit(args[1] if len(args) > 1 else None, "limits workspace")
            )
        uid = _user(arg, "limits")
        return AdminCommand(
            "limit_user", user_id=uid, number=_limit(args[1] if len(args) > 1 else None, "limits @user")
        )
    if verb in ("default-model", "allow-models", "allow-loras"):
        # `none` / `all` clear the setting; names may be separated by spaces or commas.
        names = tuple(n for n in " ".join(args).replace(",", " ").split() if n.lower() not in ("none", "all"))
        if verb == "default-model" and len(names) > 1:
            raise AdminUsage("`default-model` takes one model name, or `none`.")
        if not args:
            clear = "none" if verb == "default-model" else "all"
            raise AdminUsage(f"`{verb}` needs model or LoRA names, or `{clear}`.")
        return AdminCommand(verb.replace("-", "_"), names=names)
    if verb == "settings":
        return AdminCommand("settings")
    if verb == "channels":
        if not args:
            raise AdminUsage("`channels` needs channels (#name ...) or `all`.")
        if len(args) == 1 and args[0].lower() in ("all", "none", "everywhere"):
            return AdminCommand("channels")
        ids = [_channel(a) for a in args]
        bad = next((a for a, i in zip(args, ids, strict=True) if i is None), None)
        if bad is not None:
            raise AdminUsage(f"`{bad[:40]}` is not a channel: write #name so Slack turns it into a link.")
        return AdminCommand("channels", channels=tuple(i for i in ids if i))
    if verb == "channel-defaults":
        rest = list(args)
        channel = _channel(rest[0]) if rest else None
        if channel is not None:
            rest = rest[1:]
        if rest == ["none"]:
            return AdminCommand("channel_defaults", channels=(channel,) if channel else ())
        pairs = []
        for word in rest:
            key, eq, value = word.partition("=")
            if not eq or key.lower() not in ("model", "ar", "steps") or not value:
                raise AdminUsage(
                    f"`channel-defaults` takes model=NAME ar=W:H steps=N (or `none`), got `{word[:40]}`."
                )
            pairs.append((key.lower(), value))
        if not pairs:
            raise AdminUsage("`channel-defaults` needs model=NAME, ar=W:H or steps=N, or `none`.")
        return AdminCommand("channel_defaults", channels=(channel,) if channel else (), defaults=tuple(pairs))
    if verb == "private":
        mode = arg.lower() if arg else ""
        if mode not in ("on", "off", "default"):
            raise AdminUsage("`private` takes `on`, `off` or `default`, then #channel or `workspace`.")
        where = args[1] if len(args) > 1 else None
        workspace = where is not None and where.lower() in ("workspace", "team")
        channel = None if where is None or workspace else _channel(where)
        if where is not None and not workspace and channel is None:
            raise AdminUsage(f"`{where[:40]}` is not a channel: write #name, or `workspace`.")
        return AdminCommand(
            "private",
            channels=(channel,) if channel else (),
            private={"on": True, "off": False}.get(mode),
            workspace=workspace,
        )
    raise AdminUsage(f"unknown subcommand `{verb}`.")
