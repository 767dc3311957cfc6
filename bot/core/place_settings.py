"""Per-channel and per-guild settings: where image commands are allowed, private mode, a channel's
defaults (model, aspect ratio, steps), and the listing of all of a guild's settings with its role
limits.

A guild's/workspace's admins set them (every change audited); `Submissions` asks `rules` (or
`check`, inside its transaction) at submit time. Allowed channels: when any channel of the guild is
allowed, image commands anywhere else are refused (`NotAllowedHere`, naming where they are allowed);
none: everywhere. Private mode: a channel's own setting wins over the guild's. A channel's defaults
apply where the prompt's flags and the command's options don't say (flags always win); a default
model no longer offered, or no longer allowed, is skipped rather than refusing users for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from bot.config import BotConfig
from bot.core import validate
from bot.core.api import (
    Actor,
    BadParameters,
    ChannelDefaults,
    NotAllowedHere,
    Place,
    PlaceRules,
    PlaceSettings,
)
from bot.core.audit import Audit
from bot.core.db import Database
from bot.core.model_choice import ModelChoices
from bot.core.models import ChannelSettings, QuotaLimit
from bot.core.params import OPTION_ALIASES, Limits, parse_prompt, split_flags

# The channel_id of a guild-wide row (channel ids are platform ids, never "*").
GUILD = "*"
# Allowed channels in one list: a long list is a mistake (or a guild that wants no list at all).
MAX_ALLOWED_CHANNELS = 50
# How long a guild's rows, once read, answer the next submissions' `rules` (`_rules_at`), how many
# guilds' rows are kept so, and how many channels' rules one read keeps (channel ids are the
# callers' to choose).
RULES_FRESH_S = 0.1
MAX_FRESH_GUILDS = 10_000
MAX_CHANNEL_RULES = 10_000


class PlaceSettingsPart:
    """The core's part for channel and guild settings."""

    def __init__(
        self,
        db: Database,
        audit: Audit,
        *,
        bot: BotConfig,
        choices: ModelChoices,
        limits: Callable[[str | None], Limits],
        clock: Callable[[], dt.datetime],
    ):
        self.db = db
        self.audit = audit
        self.bot = bot
        self.choices = choices
        self.limits = limits
        self.clock = clock
        # A guild's rows being read: the read, and the callers waiting for it (`_rules_at`).
        self._reading: dict[
            tuple[str, str], tuple[asyncio.Future[None], list[asyncio.Future[_GuildRows]]]
        ] = {}
        # A guild's rows as last read: when they stop answering (monotonic), the count of changes
        # made here when the read started, the rows (`_rules_at`).
        self._fresh: dict[tuple[str, str], tuple[float, int, _GuildRows]] = {}
        self._changes = 0  # settings changes committed (or tried) through this part

    # -- at submit time ----------------------------------------------------------------------------

    async def rules(self, place: Place) -> PlaceRules:
        """What applies in `place` (no guild: nothing is set, everything allowed)."""
        return await self._rules_at(validate.place(place))

    async def _rules_at(self, place: Place) -> PlaceRules:
        """`rules` of a place already validated."""
        if place.guild_id is None:
            return PlaceRules()
        guild = (place.platform, place.guild_id)
        # Concurrent submissions in one guild share one read (every submission asks): 200 of them
        # at once cost one round trip, not 200. A read that started before a caller arrived
        # answers it too, as a read finishing just before its call would have. Each caller waits
        # on a future of its own, which the read answers (a caller that gives up cancels only its
        # own wait; `asyncio.shield` per caller cost twice the callbacks).
        # A read that ended less than RULES_FRESH_S ago answers too, unless a change was made
        # through this part since it started: a burst's next wave of submissions does not wait for
        # a read of its own (another process's change reaches the defaults within RULES_FRESH_S;
        # whether the place allows image commands, and private mode, are read again inside the
        # submit transaction, `check`).
        fresh = self._fresh.get(guild)
        if fresh is not None and fresh[1] == self._changes and time.monotonic() < fresh[0]:
            return fresh[2].rules(place.channel_id)
        loop = asyncio.get_running_loop()
        reading = self._reading.get(guild)
        # A read of another event loop (a test's, ended) is no read.
        if reading is None or reading[0].get_loop() is not loop:
            waiters: list[asyncio.Future[_GuildRows]] = []
            reading = self._reading[guild] = (asyncio.ensure_future(self._read_for(guild, waiters)), waiters)
        waiter: asyncio.Future[_GuildRows] = loop.create_future()
        reading[1].append(waiter)
        return (await waiter).rules(place.channel_id)

    async def _read_for(self, guild: tuple[str, str], waiters: list[asyncio.Future[_GuildRows]]) -> None:
        """Read `guild`'s rows and answer every caller that asked while the read ran."""
        changes = self._changes
        try:
            rows = _GuildRows(await self._read_rows(*guild))
        except BaseException as e:  # noqa: BLE001 - handed to the callers, whose error it is
            error: BaseException | None = e
        else:
            error = None
            if len(self._fresh) > MAX_FRESH_GUILDS:
                self._fresh.clear()
            self._fresh[guild] = (time.monotonic() + RULES_FRESH_S, changes, rows)
        finally:
            # The next caller starts a read of its own: taken off before anyone is answered.
            reading = self._reading.get(guild)
            if reading is not None and reading[1] is waiters:
                del self._reading[guild]
        for waiter in waiters:
            if waiter.done():
                continue
            if isinstance(error, asyncio.CancelledError):
                waiter.cancel()
            elif error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(rows)
        if isinstance(error, asyncio.CancelledError):
            raise error

    async def _read_rows(self, platform: str, guild_id: str) -> list[ChannelSettings]:
        async with self.db.read() as s:
            return await self._rows(s, platform, guild_id)

    async def check(self, s: AsyncSession, place: Place) -> PlaceRules:
        """`rules` inside the caller's transaction, refusing a place where image commands are not
        allowed (every generating path, buttons and reactions included, passes here)."""
        if place.guild_id is None:
            return PlaceRules()
        rules = _rules(await self._rows(s, place.platform, place.guild_id), place.channel_id)
        if not rules.allowed:
            raise NotAllowedHere(rules.allowed_channels)
        return rules

    async def with_defaults(
        self, place: Place, text: str, options: Mapping[str, Any] | None, *, aspect_ratio: bool = True
    ) -> Mapping[str, Any] | None:
        """`options` plus the channel's defaults for what neither `text`'s flags nor `options` give
        (`aspect_ratio` False where the size follows an image). NotAllowedHere first, if so. The
        caller has validated `place` (`validate.actor_and_place`)."""
        rules = await self._rules_at(place)
        if not rules.allowed:
            raise NotAllowedHere(rules.allowed_channels)
        d = rules.defaults
        if d.empty:
            return options
        _, flags = split_flags(text if isinstance(text, str) else "")
        given = set(flags)
        if isinstance(options, Mapping):
            given |= {
                OPTION_ALIASES.get(k, k) for k, v in options.items() if isinstance(k, str) and v is not None
            }
        merged: dict[str, Any] = dict(options or {})
        model = d.model
        if model is not None and "model" not in given:
            info = self.choices.catalog().get(model)
            settings = await self.choices.settings(place)
            if info is not None and settings.model_allowed(info.name):
                merged["model"] = info.name
            else:
                model = None
        if d.aspect_ratio is not None and aspect_ratio and "ar" not in given:
            merged["ar"] = d.aspect_ratio
        if d.steps is not None and "steps" not in given:
            # The model picked by --model may allow fewer steps than the channel's default model.
            picked = merged.get("model") if isinstance(merged.get("model"), str) else flags.get("model")
            merged["steps"] = min(d.steps, self.limits(picked).max_steps)
        return merged

    # -- admin -------------------------------------------------------------------------------------

    async def listing(self, actor: Actor, place: Place) -> PlaceSettings:
        actor, place = validate.actor_and_place(actor, place)
        guild_id = _guild(place)
        await self.audit.require_admin(actor, "place_settings", f"guild:{guild_id}")
        async with self.db.read() as s:
            return await self._listing(s, place.platform, guild_id)

    async def allow_channels(self, actor: Actor, place: Place, channel_ids: Sequence[str]) -> PlaceSettings:
        actor, place = validate.actor_and_place(actor, place)
        guild_id = _guild(place)
        await self.audit.require_admin(actor, "allow_channels", f"guild:{guild_id}")
        if isinstance(channel_ids, str):
            channel_ids = channel_ids.replace(",", " ").split()
        if not isinstance(channel_ids, (list, tuple)) or len(channel_ids) > MAX_ALLOWED_CHANNELS:
            raise BadParameters("channels", f"Give at most {MAX_ALLOWED_CHANNELS} channels, as a list.")
        wanted = list(dict.fromkeys(validate.ident("channel", c) for c in channel_ids))
        if GUILD in wanted:
            raise BadParameters("channel", f"{GUILD!r} is not a channel.", GUILD)
        async with self._writing() as s:
            rows = {r.channel_id: r for r in await self._rows(s, place.platform, guild_id)}
            for channel_id in wanted:
                if channel_id not in rows:
                    rows[channel_id] = self._new_row(s, place.platform, guild_id, channel_id)
            for channel_id, row in rows.items():
                if channel_id != GUILD:
                    row.allowed = channel_id in wanted
                    row.updated_at = self.clock()
            self.audit.record(s, actor, "allow_channels", f"guild:{guild_id}", {"channels": wanted})
            await self._prune(s, rows.values())
            return await self._listing(s, place.platform, guild_id)

    async def set_channel_defaults(
        self, actor: Actor, place: Place, channel_id: str, defaults: ChannelDefaults
    ) -> PlaceSettings:
        actor, place = validate.actor_and_place(actor, place)
        guild_id = _guild(place)
        channel_id = _channel(channel_id)
        await self.audit.require_admin(actor, "set_channel_defaults", f"channel:{channel_id}")
        if not isinstance(defaults, ChannelDefaults):
            raise TypeError(f"expected ChannelDefaults, got {type(defaults).__name__}")
        defaults = await self._checked(place, defaults)
        async with self._writing() as s:
            row = await self._row_for_update(s, place.platform, guild_id, channel_id)
            row.default_model = defaults.model
            row.default_aspect_ratio = defaults.aspect_ratio
            row.default_steps = defaults.steps
            row.updated_at = self.clock()
            self.audit.record(
                s,
                actor,
                "set_channel_defaults",
                f"channel:{channel_id}",
                {
                    "guild_id": guild_id,
                    "model": defaults.model,
                    "aspect_ratio": defaults.aspect_ratio,
                    "steps": defaults.steps,
                },
            )
            await self._prune(s, [row])
            return await self._listing(s, place.platform, guild_id)

    async def set_private(
        self, actor: Actor, place: Place, channel_id: str | None, private: bool | None
    ) -> PlaceSettings:
        actor, place = validate.actor_and_place(actor, place)
        guild_id = _guild(place)
        scope = GUILD if channel_id is None else _channel(channel_id)
        target = f"guild:{guild_id}" if scope == GUILD else f"channel:{scope}"
        await self.audit.require_admin(actor, "set_private", target)
        if private is not None and not isinstance(private, bool):
            raise BadParameters("private", f"Private mode is on or off, got {private!r}.", private)
        async with self._writing() as s:
            row = await self._row_for_update(s, place.platform, guild_id, scope)
            # The guild-wide setting is on or off; a channel's may also be "as the guild".
            row.private = (private or None) if scope == GUILD else private
            row.updated_at = self.clock()
            self.audit.record(s, actor, "set_private", target, {"guild_id": guild_id, "private": private})
            await self._prune(s, [row])
            return await self._listing(s, place.platform, guild_id)

    # -- internals ---------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[AsyncSession]:
        """A transaction that changes settings; after it (committed or not), rows read before it
        no longer answer `_rules_at`."""
        try:
            async with self.db.session() as s:
                yield s
        finally:
            self._changes += 1

    async def _checked(self, place: Place, d: ChannelDefaults) -> ChannelDefaults:
        """The defaults, checked the way a prompt's flags are: a model offered and allowed here, an
        aspect ratio and steps that model accepts (BadParameters naming the flag otherwise)."""
        model = None
        if d.model is not None and str(d.model).strip():
            catalog = self.choices.catalog()
            info = catalog.get(str(d.model).strip())
            if info is None:
                names = ", ".join(m.name for m in catalog.models) or "none to choose from"
                raise BadParameters("model", f"There is no model {d.model!r}. Models: {names}.", d.model)
            if not (await self.choices.settings(place)).model_allowed(info.name):
                raise BadParameters("model", f"The model {info.name} is not allowed here.", info.name)
            model = info.name
        options: dict[str, Any] = {}
        aspect = None
        if d.aspect_ratio is not None and str(d.aspect_ratio).strip():
            aspect = str(d.aspect_ratio).strip()
            options["ar"] = aspect
        if d.steps is not None:
            options["steps"] = d.steps
        if options:
            parsed = parse_prompt("x", options, self.bot, limits=self.limits(model), rng=random.Random(0))
            return ChannelDefaults(model, parsed.aspect_ratio if aspect else None, d.steps and parsed.steps)
        return ChannelDefaults(model, None, None)

    async def _rows(self, s: AsyncSession, platform: str, guild_id: str) -> list[ChannelSettings]:
        params = {"platform": platform, "guild_id": guild_id}
        return list((await s.execute(_GUILD_ROWS, params)).scalars().all())

    async def _row_for_update(
        self, s: AsyncSession, platform: str, guild_id: str, channel_id: str
    ) -> ChannelSettings:
        row = (
            await s.execute(
                select(ChannelSettings).where(
                    ChannelSettings.platform == platform,
                    ChannelSettings.guild_id == guild_id,
                    ChannelSettings.channel_id == channel_id,
                )
            )
        ).scalar_one_or_none()
        return row if row is not None else self._new_row(s, platform, guild_id, channel_id)

    def _new_row(self, s: AsyncSession, platform: str, guild_id: str, channel_id: str) -> ChannelSettings:
        row = ChannelSettings(
            platform=platform,
            guild_id=guild_id,
            channel_id=channel_id,
            allowed=False,
            private=None,
            default_model=None,
            default_aspect_ratio=None,
            default_steps=None,
            updated_at=self.clock(),
        )
        s.add(row)
        return row

    @staticmethod
    async def _prune(s: AsyncSession, rows: Any) -> None:
        """Rows that set nothing any more go: the listing shows what is set, nothing else."""
        for row in list(rows):
            if not row.allowed and row.private is None and _defaults_of(row).empty:
                await s.delete(row)
        await s.flush()

    async def _listing(self, s: AsyncSession, platform: str, guild_id: str) -> PlaceSettings:
        rows = await self._rows(s, platform, guild_id)
        guild_row = next((r for r in rows if r.channel_id == GUILD), None)
        channels = sorted((r for r in rows if r.channel_id != GUILD), key=lambda r: r.channel_id)
        prefix = f"{guild_id}/"
        limits = (
            await s.execute(
                select(QuotaLimit.scope_id, QuotaLimit.daily_limit).where(
                    QuotaLimit.platform == platform,
                    QuotaLimit.scope == "role",
                    QuotaLimit.scope_id.startswith(prefix, autoescape=True),
                )
            )
        ).all()
        return PlaceSettings(
            guild_id=guild_id,
            allowed_channels=tuple(r.channel_id for r in channels if r.allowed),
            private_guild=bool(guild_row and guild_row.private),
            private_channels={r.channel_id: r.private for r in channels if r.private is not None},
            defaults={r.channel_id: _defaults_of(r) for r in channels if not _defaults_of(r).empty},
            role_limits={scope_id[len(prefix) :]: limit for scope_id, limit in sorted(limits)},
        )


class _GuildRows:
    """A guild's rows as one read found them, and the rules of each channel asked about, made once
    per read (the submissions of a burst in one channel share one `PlaceRules`; it is frozen)."""

    __slots__ = ("_by_channel", "rows")

    def __init__(self, rows: list[ChannelSettings]):
        self.rows = rows
        self._by_channel: dict[str | None, PlaceRules] = {}

    def rules(self, channel_id: str | None) -> PlaceRules:
        known = self._by_channel.get(channel_id)
        if known is None:
            if len(self._by_channel) > MAX_CHANNEL_RULES:
                self._by_channel.clear()
            known = self._by_channel[channel_id] = _rules(self.rows, channel_id)
        return known


def _rules(rows: Sequence[ChannelSettings], channel_id: str | None) -> PlaceRules:
    allowed_channels = tuple(sorted(r.channel_id for r in rows if r.allowed and r.channel_id != GUILD))
    row = next((r for r in rows if r.channel_id == channel_id), None) if channel_id else None
    guild_row = next((r for r in rows if r.channel_id == GUILD), None)
    private = row.private if row is not None and row.private is not None else None
    if private is None:
        private = bool(guild_row and guild_row.private)
    return PlaceRules(
        allowed=not allowed_channels or channel_id in allowed_channels,
        allowed_channels=allowed_channels,
        private=private,
        defaults=_defaults_of(row) if row is not None else ChannelDefaults(),
    )


def _defaults_of(row: ChannelSettings) -> ChannelDefaults:
    return ChannelDefaults(row.default_model, row.default_aspect_ratio, row.default_steps)


def _guild(place: Place) -> str:
    if place.guild_id is None:
        raise BadParameters(
            "guild", "Channel settings belong to a server or workspace: use this command in one."
        )
    return place.guild_id


def _channel(channel_id: Any) -> str:
    channel_id = validate.ident("channel", channel_id)
    if channel_id == GUILD:
        raise BadParameters("channel", f"{GUILD!r} is not a channel.", channel_id)
    return channel_id


__all__ = ["PlaceSettingsPart"]


# A guild's rows, read by every submission's batch: built once, with its values as parameters (a
# statement built per read is also a cache key computed per read).
_GUILD_ROWS = (
    select(ChannelSettings)
    .where(
        ChannelSettings.platform == bindparam("platform"), ChannelSettings.guild_id == bindparam("guild_id")
    )
    .execution_options(populate_existing=True)
)
