"""A fake Discord (REST API + gateway) served on 127.0.0.1 for running the real discord.py against.

It speaks just enough of Discord's protocol for a `commands.Bot` to log in, receive READY and
GUILD_CREATE, sync application commands, receive INTERACTION_CREATE / MESSAGE_REACTION_ADD and answer
through interaction callbacks, followup webhooks and channel messages. It enforces the rules a bot
must respect on the real platform, so a test fails where real Discord would:

- an interaction callback later than 3 s after dispatch gets 404 / 10062 "Unknown interaction";
- an interaction token older than 15 minutes (by the interaction id's snowflake time) gets
  401 / 50027 "Invalid Webhook Token";
- an upload larger than the interaction's `attachment_size_limit` (or the guild's limit for channel
  messages) gets 413 / 40005;
- injected failures (e.g. a 429 with `retry_after` and a `Via` header, as Discord sends them);
- a channel message sent with a `nonce` and `enforce_nonce` within `nonce_window_s` of an earlier one
  with the same nonce is not created again: the earlier message is returned, as Discord does;
- with `rate_limits=True`, Discord's per-channel limits on bot messages (5 per 5 s, creates and
  edits of channel messages) and reactions (1 per 0.25 s): the rate-limit headers on every answer
  of those routes, and 429 with `retry_after` (and `Via`, so discord.py retries) past them; every
  429 is recorded in `rate_limited`.

Buttons: a message keeps the `components` the bot sent; `click()` sends the component interaction a
user's click makes, `submit_modal()` the submission of the dialog a click opened.

The fake runs its own event loop in a daemon thread, so its clock (dispatch -> callback) and its
heartbeat answers do not depend on the bot's loop being responsive: a bot that blocks its loop is
seen to miss the deadline instead of hiding it. Test code calls the async helpers from the test's
loop; they hop to the fake's loop. Everything recorded is plain data in lists and dicts.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import yarl
from aiohttp import WSMsgType, web

DISCORD_EPOCH_MS = 1420070400000
# Discord's own figures (developer docs, "Receiving and Responding"): 3 s to answer an interaction,
# 15 min of validity for its token; the fake uses them to reject late bot behaviour like Discord does.
INTERACTION_DEADLINE_S = 3.0
INTERACTION_TOKEN_TTL_S = 15 * 60
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024  # Discord's default per-file limit for bots
# Discord checks an enforced nonce against the author's messages "in the past few minutes".
NONCE_WINDOW_S = 5 * 60
# Discord's per-channel limits for a bot (observed, as the community documents them): 5 messages
# (created or edited) per 5 s, and one reaction per 0.25 s.
CHANNEL_MESSAGES_PER_WINDOW, CHANNEL_MESSAGE_WINDOW_S = 5, 5.0
REACTIONS_PER_WINDOW, REACTION_WINDOW_S = 1, 0.25
JSON = "application/json"  # exactly this: discord.py ignores bodies with "; charset=utf-8"

# Permission bits used by tests (Discord's documented values).
PERM_MANAGE_GUILD = 1 << 5
PERM_MEMBER_DEFAULT = (
    (1 << 10) | (1 << 11) | (1 << 6) | (1 << 15) | (1 << 16)
)  # view, send, react, attach, history


def snowflake_at(ms_since_unix: int, counter: int) -> int:
    return ((ms_since_unix - DISCORD_EPOCH_MS) << 22) | (counter & 0x3FFFFF)


def snowflake_time_s(snowflake: int) -> float:
    return ((snowflake >> 22) + DISCORD_EPOCH_MS) / 1000.0


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1e6):06d}+00:00"


@dataclass
class FakeUser:
    id: int
    username: str
    bot: bool = False
    roles: list[int] = field(default_factory=list)
    permissions: int = PERM_MEMBER_DEFAULT

    def user_payload(self) -> dict:
        return {
            "id": str(self.id),
            "username": self.username,
            "global_name": self.username,
            "discriminator": "0",
            "avatar": None,
            "bot": self.bot,
            "public_flags": 0,
        }

    def member_payload(self, with_permissions: bool = True) -> dict:
        data = {
            "user": self.user_payload(),
            "roles": [str(r) for r in self.roles],
            "joined_at": _iso(time.time() - 86400),
            "deaf": False,
            "mute": False,
            "flags": 0,
            "nick": None,
            "avatar": None,
            "pending": False,
            "premium_since": None,
        }
        if with_permissions:
            data["permissions"] = str(self.permissions)
        return data


@dataclass
class Interaction:
    """One INTERACTION_CREATE sent to the bot, and everything the bot did with it."""

    id: int
    token: str
    name: str
    user: FakeUser
    channel_id: int
    payload: dict
    dispatched_at: float = 0.0
    callback_at: float | None = None
    callbacks: list[dict] = field(default_factory=list)  # {"status": int, "body": dict}
    followups: list[dict] = field(default_factory=list)  # messages created through the webhook
    edits: list[dict] = field(default_factory=list)  # PATCHes of @original / followups (payloads)
    original: dict | None = None  # the message shown for the response (after a defer or reply)
    deleted_original: bool = False
    message: dict | None = None  # the message a component interaction came from
    modal: dict | None = None  # the dialog the bot opened in answer (callback type 9)
    choices: list[dict] | None = None  # an autocomplete's answer (callback type 8)

    @property
    def deferred(self) -> bool:
        return any(c["status"] == 200 and c["body"].get("type") == 5 for c in self.callbacks)

    @property
    def ephemeral(self) -> bool:
        for c in self.callbacks:
            flags = (c["body"].get("data") or {}).get("flags", 0)
            if flags & 64:
                return True
        return False

    def texts(self) -> list[str]:
        """Every text the user was shown for this interaction, in order (edits and followups)."""
        out = []
        for c in self.callbacks:
            content = (c["body"].get("data") or {}).get("content")
            if content:
                out.append(content)
        events = sorted(self.edits + self.followups, key=lambda m: m["_seq"])
        for m in events:
            if m.get("content"):
                out.append(m["content"])
        return out


@dataclass
class Held:
    """A request `FakeDiscord.hold_next` keeps unanswered; thread-safe (the fake has its own loop)."""

    method: str
    path: re.Pattern[str]
    with_files: bool
    arrived: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def matches(self, request: web.Request, path: str) -> bool:
        return (
            not self.arrived.is_set()
            and request.method == self.method
            and self.path.search(path) is not None
            and (not self.with_files or request.content_type.startswith("multipart/"))
        )

    def release(self) -> None:
        self.released.set()


class FakeDiscord:
    """The fake platform. `await start()` / `await stop()`; see the module docstring."""

    def __init__(self, *, heartbeat_interval_ms: int = 500, rate_limits: bool = False):
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.rate_limits = rate_limits
        self._windows: dict[tuple[str, int], tuple[float, int]] = {}  # (kind, channel) -> (start, used)
        self.rate_limited: list[tuple[str, str]] = []  # (method, path) of each 429 for a limit
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)
        self.app_id = self.new_id()
        self.bot_user = FakeUser(self.app_id, "imagine-bot", bot=True, permissions=(1 << 3))
        self.guild_id = self.new_id()
        self.channel_id = self.new_id()
        self.admin_role_id = self.new_id()
        self.upload_limit = DEFAULT_UPLOAD_LIMIT
        self.token = "fake-bot-token"
        # Recorded traffic.
        self.requests: list[tuple[str, str]] = []  # (method, path) of every REST call
        self.command_syncs: list[dict] = []  # {"method", "guild_id", "payload"}
        self.interactions: dict[int, Interaction] = {}
        self.messages: dict[int, dict] = {}  # channel messages and interaction messages by id
        self.reactions: list[tuple[int, str, int]] = []  # (message_id, emoji, user_id) added via REST
        self.heartbeats: list[float] = []  # monotonic time of each heartbeat answered
        self.identifies: list[dict] = []
        self.resumes: list[dict] = []
        self.attachments: dict[str, tuple[str, bytes]] = {}  # "id/filename" -> (content type, bytes)
        self.downloads: list[str] = []  # attachment keys fetched by the bot
        self.nonce_window_s = NONCE_WINDOW_S
        self._nonces: dict[str, tuple[int, float]] = {}  # nonce -> (message id, monotonic time)
        self.nonce_hits: list[str] = []  # nonces answered with an existing message
        self._failures: list[dict] = []
        self._holds: list[Held] = []
        self._sockets: list[web.WebSocketResponse] = []
        self._gateway_seq = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.users: dict[int, FakeUser] = {}

    # ---- identities -------------------------------------------------------------------------

    def new_id(self, at: float | None = None) -> int:
        """A snowflake whose timestamp is `at` (unix seconds, default now)."""
        ms = int((time.time() if at is None else at) * 1000)
        return snowflake_at(ms, next(self._ids))

    def user(
        self, name: str, *, admin: bool = False, roles: list[int] | None = None, bot: bool = False
    ) -> FakeUser:
        perms = PERM_MEMBER_DEFAULT | (PERM_MANAGE_GUILD if admin else 0)
        u = FakeUser(self.new_id(), name, bot=bot, roles=list(roles or []), permissions=perms)
        self.users[u.id] = u
        return u

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        return f"{self.base_url}/api/v10"

    @property
    def gateway_url(self) -> yarl.URL:
        return yarl.URL(f"ws://127.0.0.1:{self.port}/gateway")

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        started = threading.Event()
        errors: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve())
            except BaseException as e:  # surfaced to start()
                errors.append(e)
                started.set()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=serve, name="fake-discord", daemon=True)
        self._thread.start()
        await asyncio.to_thread(started.wait, 10)
        if errors:
            raise errors[0]

    async def _serve(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/attachments/{key:.+}", self._attachment)
        app.router.add_route("*", "/api/v10/{path:.*}", self._rest)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _shutdown(self) -> None:
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        for held in self._holds:
            held.release()
        self._loop.call_soon_threadsafe(self._loop.stop)
        await asyncio.to_thread(self._thread.join, 10)

    async def _on_fake_loop(self, coro) -> Any:
        assert self._loop is not None
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    # ---- failure injection ------------------------------------------------------------------

    def fail_next(
        self,
        method: str,
        path_regex: str,
        *,
        status: int = 429,
        retry_after: float = 0.1,
        code: int = 0,
        times: int = 1,
    ) -> None:
        """The next `times` requests matching answer `status` (429s the way Discord sends them)."""
        self._failures.append(
            {
                "method": method,
                "re": re.compile(path_regex),
                "status": status,
                "retry_after": retry_after,
                "code": code,
                "left": times,
                "hits": 0,
            }
        )

    def failures_hit(self) -> int:
        return sum(f["hits"] for f in self._failures)

    def hold_next(self, method: str, path_regex: str, *, with_files: bool = False) -> Held:
        """The next request matching (one carrying files, when `with_files`) is left unanswered
        until `release()`: a post in flight for as long as the test needs."""
        held = Held(method, re.compile(path_regex), with_files)
        self._holds.append(held)
        return held

    # ---- gateway ----------------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        self._sockets.append(ws)
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": self.heartbeat_interval_ms}}))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                op = data.get("op")
                if op == 1:
                    self.heartbeats.append(time.monotonic())
                    await ws.send_str(json.dumps({"op": 11}))
                elif op == 2:
                    self.identifies.append(data["d"])
                    await self._send_ready(ws)
                elif op == 6:
                    self.resumes.append(data["d"])
                    await self._send(ws, "RESUMED", {})
        finally:
            self._sockets.remove(ws)
        return ws

    async def _send(self, ws: web.WebSocketResponse, event: str, data: dict) -> None:
        await ws.send_str(json.dumps({"op": 0, "t": event, "s": next(self._gateway_seq), "d": data}))

    async def _send_ready(self, ws: web.WebSocketResponse) -> None:
        await self._send(
            ws,
            "READY",
            {
                "v": 10,
                "user": {**self.bot_user.user_payload(), "verified": True, "mfa_enabled": False, "flags": 0},
                "guilds": [{"id": str(self.guild_id), "unavailable": True}],
                "session_id": f"session-{len(self.identifies)}",
                "resume_gateway_url": str(self.gateway_url),
                "application": {"id": str(self.app_id), "flags": 0},
                "private_channels": [],
                "relationships": [],
            },
        )
        await self._send(ws, "GUILD_CREATE", self.guild_payload())

    def guild_payload(self) -> dict:
        return {
            "id": str(self.guild_id),
            "name": "Test Server",
            "icon": None,
            "owner_id": str(self.new_id()),
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "premium_tier": 0,
            "preferred_locale": "en-US",
            "features": [],
            "unavailable": False,
            "large": False,
            "member_count": 3,
            "roles": self._roles(),
            "channels": [
                {
                    "id": str(self.channel_id),
                    "type": 0,
                    "name": "general",
                    "position": 0,
                    "permission_overwrites": [],
                    "nsfw": False,
                    "topic": None,
                    "last_message_id": None,
                    "rate_limit_per_user": 0,
                    "parent_id": None,
                    "guild_id": str(self.guild_id),
                },
            ],
            "members": [self.bot_user.member_payload(with_permissions=False)],
            "emojis": [],
            "stickers": [],
            "threads": [],
            "voice_states": [],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
        }

    async def dispatch(self, event: str, data: dict) -> None:
        """Send a gateway event to every connected bot."""

        async def send() -> None:
            for ws in list(self._sockets):
                await self._send(ws, event, data)

        await self._on_fake_loop(send())

    async def drop_gateway(self, code: int = 4000) -> None:
        """Close every gateway connection the way Discord does on an error (4000: unknown error, resumable)."""

        async def close() -> None:
            for ws in list(self._sockets):
                await ws.close(code=code, message=b"fake: dropped")

        await self._on_fake_loop(close())

    def connected(self) -> bool:
        return bool(self._sockets)

    # ---- test-side helpers ------------------------------------------------------------------

    def add_attachment(
        self,
        filename: str,
        data: bytes,
        content_type: str,
        *,
        size: int | None = None,
        width: int | None = None,
        height: int | None = None,
    ) -> dict:
        """Serve `data` from the fake and return the attachment object an interaction carries."""
        att_id = self.new_id()
        key = f"{att_id}/{filename}"
        self.attachments[key] = (content_type, data)
        obj = {
            "id": str(att_id),
            "filename": filename,
            "size": len(data) if size is None else size,
            "url": f"{self.base_url}/attachments/{key}",
            "proxy_url": f"{self.base_url}/attachments/{key}",
            "content_type": content_type,
        }
        if width is not None:
            obj["width"], obj["height"] = width, height
        return obj

    def _roles(self) -> list[dict]:
        """The guild's roles: @everyone (its id is the guild's) and the admin role."""
        return [
            {
                "id": str(self.guild_id),
                "name": "@everyone",
                "permissions": str(PERM_MEMBER_DEFAULT),
                "position": 0,
                "color": 0,
                "hoist": False,
                "managed": False,
                "mentionable": False,
                "flags": 0,
            },
            {
                "id": str(self.admin_role_id),
                "name": "Imagine Admin",
                "permissions": str(PERM_MEMBER_DEFAULT),
                "position": 1,
                "color": 0,
                "hoist": False,
                "managed": False,
                "mentionable": False,
                "flags": 0,
            },
        ]

    async def slash(
        self, name: str, user: FakeUser, options: dict[str, Any] | None = None, **kwargs: Any
    ) -> Interaction:
        """Dispatch an application command interaction and return its record (see `build_slash`)."""
        record = self.build_slash(name, user, options, **kwargs)
        await self.send_interactions([record])
        return record

    def build_slash(
        self,
        name: str,
        user: FakeUser,
        options: dict[str, Any] | None = None,
        *,
        subcommand: list[str] | None = None,
        attachments: dict[str, dict] | None = None,
        command_options: dict[str, int] | None = None,
        created_at: float | None = None,
        size_limit: int | None = None,
    ) -> Interaction:
        """An application command interaction, not sent yet.

        `options` are plain values (types guessed: str 3, int 4, bool 5, float 10, FakeUser 6);
        attachments go through `attachments` (from `add_attachment`); `subcommand` nests the options,
        e.g. ["credits"]. `created_at` backdates the interaction id, hence its token's age.
        """
        options = dict(options or {})
        opts: list[dict] = []
        resolved: dict[str, Any] = {}
        for key, value in options.items():
            if isinstance(value, bool):
                typ = 5
            elif isinstance(value, int):
                typ = 4
            elif isinstance(value, float):
                typ = 10
            elif isinstance(value, FakeUser):
                typ = 6
                resolved.setdefault("users", {})[str(value.id)] = value.user_payload()
                resolved.setdefault("members", {})[str(value.id)] = {
                    k: v for k, v in value.member_payload().items() if k != "user"
                }
                value = str(value.id)
            else:
                typ = 3
            if command_options and key in command_options:
                typ = command_options[key]
            if typ == 8:  # a role option: the guild's role of that id, resolved as Discord does
                role = next(r for r in self._roles() if r["id"] == str(value))
                resolved.setdefault("roles", {})[role["id"]] = role
                value = role["id"]
            opts.append({"name": key, "type": typ, "value": value})
        for key, att in (attachments or {}).items():
            opts.append({"name": key, "type": 11, "value": att["id"]})
            resolved.setdefault("attachments", {})[att["id"]] = att
        for sub in reversed(subcommand or []):
            opts = [{"name": sub, "type": 1, "options": opts}]
        data: dict[str, Any] = {"id": str(self.new_id()), "name": name, "type": 1, "options": opts}
        if resolved:
            data["resolved"] = resolved
        iid = self.new_id(created_at)
        payload = self._interaction_payload(iid, 2, data, user, size_limit)
        return Interaction(iid, payload["token"], name, user, self.channel_id, payload)

    async def autocomplete(
        self,
        name: str,
        user: FakeUser,
        options: dict[str, Any],
        focused: str,
        *,
        subcommand: list[str] | None = None,
    ) -> Interaction:
        """Dispatch an autocomplete interaction (type 4) while `user` types option `focused` of
        command `name` (the other `options` as typed so far); the bot's suggestions arrive in the
        record's `choices`."""
        record = self.build_slash(name, user, options, subcommand=subcommand)
        data = record.payload["data"]
        opts = data["options"]
        while opts and opts[0].get("type") == 1:  # into the subcommand
            opts = opts[0]["options"]
        for opt in opts:
            if opt["name"] == focused:
                opt["focused"] = True
                opt["type"] = 3  # the text typed so far, whatever the option's type
                opt["value"] = str(opt["value"])
        payload = self._interaction_payload(record.id, 4, data, user)
        record = Interaction(record.id, payload["token"], name, user, self.channel_id, payload)
        await self.send_interactions([record])
        return record

    def _interaction_payload(
        self, iid: int, kind: int, data: dict, user: FakeUser, size_limit: int | None = None
    ) -> dict:
        return {
            "id": str(iid),
            "application_id": str(self.app_id),
            "type": kind,
            "token": f"itoken-{iid}",
            "version": 1,
            "data": data,
            "guild_id": str(self.guild_id),
            "guild": {"id": str(self.guild_id), "locale": "en-US", "features": []},
            "channel_id": str(self.channel_id),
            "channel": {
                "id": str(self.channel_id),
                "type": 0,
                "name": "general",
                "guild_id": str(self.guild_id),
                "permissions": str(PERM_MEMBER_DEFAULT),
            },
            "member": user.member_payload(),
            "app_permissions": str(PERM_MEMBER_DEFAULT),
            "locale": "en-US",
            "guild_locale": "en-US",
            "entitlements": [],
            "authorizing_integration_owners": {"0": str(self.guild_id)},
            "context": 0,
            "attachment_size_limit": size_limit or self.upload_limit,
        }

    def button_ids(self, message: dict) -> list[list[str]]:
        """The custom ids of a message's buttons, row by row (as a user sees them)."""
        return [
            [c.get("custom_id", "") for c in row.get("components", [])]
            for row in message.get("components") or []
        ]

    async def click(self, message: dict, custom_id: str, user: FakeUser) -> Interaction:
        """A user clicks the button `custom_id` of `message` (a MESSAGE_COMPONENT interaction).
        Like Discord, only a button the message has can be clicked."""
        current = self.messages.get(int(message["id"]), message)
        assert any(custom_id in row for row in self.button_ids(current)), (
            custom_id,
            self.button_ids(current),
        )
        iid = self.new_id()
        payload = self._interaction_payload(iid, 3, {"custom_id": custom_id, "component_type": 2}, user)
        payload["message"] = self._public(current)
        record = Interaction(iid, payload["token"], f"button {custom_id}", user, self.channel_id, payload)
        record.message = current
        await self.send_interactions([record])
        return record

    async def submit_modal(
        self, opened_by: Interaction, values: dict[str, str], user: FakeUser
    ) -> Interaction:
        """`user` submits the dialog the bot opened in answer to `opened_by`, with `values` by field."""
        assert opened_by.modal is not None, "the bot opened no dialog"
        rows = [
            {"type": 1, "components": [{"type": 4, "custom_id": k, "value": v}]} for k, v in values.items()
        ]
        iid = self.new_id()
        payload = self._interaction_payload(
            iid, 5, {"custom_id": opened_by.modal["custom_id"], "components": rows}, user
        )
        if opened_by.message is not None:
            payload["message"] = self._public(
                self.messages.get(int(opened_by.message["id"]), opened_by.message)
            )
        record = Interaction(iid, payload["token"], "modal", user, self.channel_id, payload)
        record.message = opened_by.message
        await self.send_interactions([record])
        return record

    async def send_interactions(self, records: list[Interaction]) -> None:
        """Send INTERACTION_CREATEs back to back from the fake's loop (a burst when there are many)."""
        for record in records:
            self.interactions[record.id] = record

        async def send() -> None:
            for record in records:
                record.dispatched_at = time.monotonic()
                for ws in list(self._sockets):
                    await self._send(ws, "INTERACTION_CREATE", record.payload)

        await self._on_fake_loop(send())

    async def react(self, message_id: int, emoji: str, user: FakeUser) -> None:
        """A user adds a reaction to a message (MESSAGE_REACTION_ADD)."""
        msg = self.messages.get(message_id)
        await self.dispatch(
            "MESSAGE_REACTION_ADD",
            {
                "user_id": str(user.id),
                "channel_id": str(msg["channel_id"] if msg else self.channel_id),
                "message_id": str(message_id),
                "guild_id": str(self.guild_id),
                "member": user.member_payload(),
                "emoji": {"id": None, "name": emoji},
                "burst": False,
                "type": 0,
                "message_author_id": str(msg["author"]["id"]) if msg else None,
            },
        )

    async def wait_for(
        self, predicate: Callable[[], Any], within: float = 60.0, what: str = "condition"
    ) -> Any:
        """Poll `predicate` until it returns something truthy (the fake's state changes on its thread).
        `within` only bounds a failing test (a loaded 2-core CI machine is many times slower than a
        desk): a condition met returns at once."""
        deadline = time.monotonic() + within
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {within}s waiting for {what}")
            await asyncio.sleep(0.02)

    def channel_messages(self, channel_id: int | None = None) -> list[dict]:
        cid = channel_id or self.channel_id
        return [
            m
            for m in list(self.messages.values())
            if m["channel_id"] == str(cid) and not m.get("_interaction")
        ]

    def reactions_on(self, message_id: int) -> list[str]:
        return [e for (m, e, _u) in list(self.reactions) if m == message_id]

    # ---- REST -------------------------------------------------------------------------------

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["path"]
        self.requests.append((request.method, path))
        for held in self._holds:
            if held.matches(request, path):
                # A JSON body is read first: Discord has the whole request and acts on it even if the
                # bot goes away meanwhile. (A multipart one is read by its route: aiohttp's multipart
                # reader reads the stream, not a body read before.)
                if not request.content_type.startswith("multipart/"):
                    await request.read()
                held.arrived.set()
                await asyncio.to_thread(held.released.wait)  # the fake's loop answers the rest meanwhile
        for f in self._failures:
            if f["left"] > 0 and f["method"] == request.method and f["re"].search(path):
                f["left"] -= 1
                f["hits"] += 1
                if f["status"] == 429:
                    return self._json(
                        {
                            "message": "You are being rate limited.",
                            "retry_after": f["retry_after"],
                            "global": False,
                        },
                        status=429,
                        headers={
                            "Via": "1.1 google",
                            "Retry-After": str(f["retry_after"]),
                            "X-RateLimit-Scope": "user",
                        },
                    )
                return self._error(f["status"], f["code"], "injected failure")
        if request.headers.get("Authorization") not in (None, f"Bot {self.token}"):
            return self._error(401, 0, "401: Unauthorized")
        limit = self._limit_for(request.method, path)
        headers: dict[str, str] = {}
        if limit is not None:
            refused, headers = self._take(*limit)
            if refused is not None:
                self.rate_limited.append((request.method, path))
                return self._json(
                    {"message": "You are being rate limited.", "retry_after": refused, "global": False},
                    status=429,
                    headers={"Via": "1.1 google", "Retry-After": str(refused), **headers},
                )
        for method, pattern, handler in self._routes():
            if method != request.method:
                continue
            m = re.fullmatch(pattern, path)
            if m:
                response = await handler(request, *m.groups())
                response.headers.update(headers)
                return response
        return self._error(404, 0, f"fake Discord has no route {request.method} {path}")

    def _limit_for(self, method: str, path: str) -> tuple[str, int, int, float] | None:
        """(bucket kind, channel, allowed, window) of a rate-limited route, or None."""
        if not self.rate_limits:
            return None
        if m := re.fullmatch(r"/channels/(\d+)/messages/\d+/reactions/[^/]+/@me", path):
            return (
                ("reaction", int(m[1]), REACTIONS_PER_WINDOW, REACTION_WINDOW_S) if method == "PUT" else None
            )
        if (m := re.fullmatch(r"/channels/(\d+)/messages(?:/\d+)?", path)) and method in ("POST", "PATCH"):
            return ("message", int(m[1]), CHANNEL_MESSAGES_PER_WINDOW, CHANNEL_MESSAGE_WINDOW_S)
        return None

    def _take(
        self, kind: str, channel: int, allowed: int, window_s: float
    ) -> tuple[float | None, dict[str, str]]:
        """Count one request in its window: (None, headers) when allowed, (retry_after, headers)
        when the window is full. The headers are Discord's, so discord.py can wait on its own."""
        now = time.monotonic()
        start, used = self._windows.get((kind, channel), (now, 0))
        if now - start >= window_s:
            start, used = now, 0
        reset_after = max(0.0, start + window_s - now)
        bucket = {"X-RateLimit-Limit": str(allowed), "X-RateLimit-Bucket": f"{kind}-{channel}",
                  "X-RateLimit-Reset-After": f"{reset_after:.3f}",
                  "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}"}  # fmt: skip
        if used >= allowed:
            return reset_after, {**bucket, "X-RateLimit-Remaining": "0", "X-RateLimit-Scope": "user"}
        self._windows[(kind, channel)] = (start, used + 1)
        return None, {**bucket, "X-RateLimit-Remaining": str(allowed - used - 1)}

    def _routes(self) -> list[tuple[str, str, Callable]]:
        return [
            ("GET", r"/users/@me", self._me),
            ("GET", r"/oauth2/applications/@me", self._application),
            ("GET", r"/gateway(?:/bot)?", self._gateway_info),
            ("PUT", r"/applications/(\d+)/commands", self._sync_global),
            ("PUT", r"/applications/(\d+)/guilds/(\d+)/commands", self._sync_guild),
            ("GET", r"/applications/(\d+)/commands", self._list_global),
            ("GET", r"/applications/(\d+)/guilds/(\d+)/commands", self._list_guild),
            ("POST", r"/interactions/(\d+)/([^/]+)/callback", self._callback),
            ("POST", r"/webhooks/(\d+)/([^/]+)", self._followup),
            ("PATCH", r"/webhooks/(\d+)/([^/]+)/messages/(@original|\d+)", self._edit_webhook_message),
            ("GET", r"/webhooks/(\d+)/([^/]+)/messages/(@original|\d+)", self._get_webhook_message),
            ("DELETE", r"/webhooks/(\d+)/([^/]+)/messages/(@original|\d+)", self._delete_webhook_message),
            ("POST", r"/channels/(\d+)/messages", self._create_message),
            ("PATCH", r"/channels/(\d+)/messages/(\d+)", self._edit_message),
            ("GET", r"/channels/(\d+)/messages/(\d+)", self._get_message),
            ("GET", r"/channels/(\d+)/messages", self._list_messages),
            ("PUT", r"/channels/(\d+)/messages/(\d+)/reactions/([^/]+)/@me", self._add_reaction),
            ("GET", r"/channels/(\d+)", self._get_channel),
        ]

    @staticmethod
    def _json(data: Any, status: int = 200, headers: dict | None = None) -> web.Response:
        return web.Response(
            body=json.dumps(data).encode(), status=status, headers={"Content-Type": JSON, **(headers or {})}
        )

    def _error(self, status: int, code: int, message: str) -> web.Response:
        return self._json({"code": code, "message": message}, status=status)

    async def _me(self, request: web.Request) -> web.Response:
        return self._json(
            {**self.bot_user.user_payload(), "verified": True, "mfa_enabled": False, "flags": 0}
        )

    async def _application(self, request: web.Request) -> web.Response:
        return self._json(
            {
                "id": str(self.app_id),
                "name": "imagine-bot",
                "icon": None,
                "description": "",
                "bot_public": True,
                "bot_require_code_grant": False,
                "verify_key": "00",
                "flags": 0,
                "owner": self.bot_user.user_payload(),
                "team": None,
                "summary": "",
                "rpc_origins": [],
            }
        )

    async def _gateway_info(self, request: web.Request) -> web.Response:
        return self._json(
            {
                "url": str(self.gateway_url),
                "shards": 1,
                "session_start_limit": {
                    "total": 1000,
                    "remaining": 1000,
                    "reset_after": 0,
                    "max_concurrency": 1,
                },
            }
        )

    def _commands_with_ids(self, payload: list[dict], guild_id: str | None) -> list[dict]:
        out = []
        for cmd in payload:
            c = {
                "id": str(self.new_id()),
                "application_id": str(self.app_id),
                "version": "1",
                "type": 1,
                "description": "",
                "options": [],
                **cmd,
            }
            if guild_id:
                c["guild_id"] = guild_id
            out.append(c)
        return out

    async def _sync_global(self, request: web.Request, app_id: str) -> web.Response:
        payload = await request.json()
        self.command_syncs.append({"guild_id": None, "payload": payload})
        return self._json(self._commands_with_ids(payload, None))

    async def _sync_guild(self, request: web.Request, app_id: str, guild_id: str) -> web.Response:
        payload = await request.json()
        if int(guild_id) != self.guild_id:
            return self._error(403, 50001, "Missing Access")
        self.command_syncs.append({"guild_id": int(guild_id), "payload": payload})
        return self._json(self._commands_with_ids(payload, guild_id))

    async def _list_global(self, request: web.Request, app_id: str) -> web.Response:
        syncs = [s for s in self.command_syncs if s["guild_id"] is None]
        return self._json(self._commands_with_ids(syncs[-1]["payload"], None) if syncs else [])

    async def _list_guild(self, request: web.Request, app_id: str, guild_id: str) -> web.Response:
        syncs = [s for s in self.command_syncs if s["guild_id"] == int(guild_id)]
        return self._json(self._commands_with_ids(syncs[-1]["payload"], guild_id) if syncs else [])

    async def _read_message_body(self, request: web.Request) -> tuple[dict, list[tuple[str, str, bytes]]]:
        """JSON or multipart (payload_json + files[n]) -> (payload, [(field, filename, bytes)])."""
        if request.content_type.startswith("multipart/"):
            payload: dict = {}
            files = []
            reader = await request.multipart()
            async for part in reader:
                if part.name == "payload_json":
                    payload = json.loads(await part.text())
                else:
                    files.append((part.name or "", part.filename or "", bytes(await part.read())))
            return payload, files
        text = await request.text()
        return (json.loads(text) if text else {}), []

    def _message(
        self,
        channel_id: int,
        payload: dict,
        files: list[tuple[str, str, bytes]],
        *,
        interaction: Interaction | None = None,
        message_id: int | None = None,
    ) -> dict:
        mid = message_id or self.new_id()
        atts = []
        for i, (_field, filename, data) in enumerate(files):
            key = f"{mid}-{i}/{filename}"
            self.attachments[key] = ("image/png", data)
            atts.append(
                {
                    "id": str(self.new_id()),
                    "filename": filename,
                    "size": len(data),
                    "url": f"{self.base_url}/attachments/{key}",
                    "proxy_url": f"{self.base_url}/attachments/{key}",
                    "content_type": "image/png",
                }
            )
        msg = {
            "id": str(mid),
            "channel_id": str(channel_id),
            "guild_id": str(self.guild_id),
            "type": 20 if interaction else 0,
            "content": payload.get("content") or "",
            "author": self.bot_user.user_payload(),
            "attachments": atts,
            "embeds": payload.get("embeds") or [],
            "components": payload.get("components") or [],
            "mentions": [],
            "mention_roles": [],
            "mention_everyone": False,
            "pinned": False,
            "tts": False,
            "timestamp": _iso(time.time()),
            "edited_timestamp": None,
            "flags": payload.get("flags", 0) or 0,
            "_seq": next(self._seq),
            "_files": [data for (_f, _n, data) in files],
            "_reference": payload.get("message_reference"),
            "_allowed_mentions": payload.get("allowed_mentions"),
        }
        if interaction is not None:
            msg["webhook_id"] = str(self.app_id)
            msg["application_id"] = str(self.app_id)
            msg["_interaction"] = interaction.id
        return msg

    @staticmethod
    def _public(msg: dict) -> dict:
        return {k: v for k, v in msg.items() if not k.startswith("_")}

    def _too_large(self, files: list[tuple[str, str, bytes]], limit: int) -> web.Response | None:
        for _f, name, data in files:
            if len(data) > limit:
                return self._error(
                    413, 40005, f"Request entity too large: {name} is {len(data)} bytes > {limit}"
                )
        return None

    def _find_interaction(self, token: str) -> Interaction | None:
        for rec in list(self.interactions.values()):
            if rec.token == token:
                return rec
        return None

    def _token_error(self, rec: Interaction | None) -> web.Response | None:
        if rec is None:
            return self._error(404, 10015, "Unknown Webhook")
        if time.time() - snowflake_time_s(rec.id) > INTERACTION_TOKEN_TTL_S:
            return self._error(401, 50027, "Invalid Webhook Token")
        return None

    async def _callback(self, request: web.Request, iid: str, token: str) -> web.Response:
        rec = self.interactions.get(int(iid))
        body, files = await self._read_message_body(request)
        if rec is None or rec.token != token:
            return self._error(404, 10062, "Unknown interaction")
        late = time.monotonic() - rec.dispatched_at > INTERACTION_DEADLINE_S
        if late or rec.callbacks and any(c["status"] == 200 for c in rec.callbacks):
            rec.callbacks.append({"status": 404 if late else 400, "body": body})
            if late:
                return self._error(404, 10062, "Unknown interaction")
            return self._error(400, 40060, "Interaction has already been acknowledged.")
        rec.callback_at = time.monotonic()
        rec.callbacks.append({"status": 200, "body": body})
        data = body.get("data") or {}
        kind = body.get("type")
        if kind == 8:  # autocomplete suggestions: nothing is posted
            rec.choices = list(data.get("choices") or [])
            return self._json(
                {"interaction": {"id": iid, "type": 4, "activity_instance_id": None}, "resource": {"type": 8}}
            )
        if kind in (6, 7, 9):
            if kind == 9:  # a dialog: nothing is posted
                rec.modal = data
            elif rec.message is not None:  # an update of the message the button is on
                target = self.messages[int(rec.message["id"])]
                if kind == 7:
                    target = {**target, **{k: v for k, v in data.items() if k in ("content", "components")}}
                    self.messages[int(target["id"])] = target
                rec.original = target
            response = {
                "interaction": {"id": iid, "type": rec.payload["type"], "activity_instance_id": None},
                "resource": {"type": kind},
            }
            if rec.original is not None and kind != 9:
                response["resource"]["message"] = self._public(rec.original)
            return self._json(response)
        msg = self._message(rec.channel_id, data, files, interaction=rec)
        if body.get("type") == 5:
            msg["flags"] = data.get("flags", 0) | 128  # "loading" until the first followup edits it
        rec.original = msg
        self.messages[int(msg["id"])] = msg
        response = {
            "interaction": {
                "id": iid,
                "type": 2,
                "activity_instance_id": None,
                "response_message_id": msg["id"],
                "response_message_loading": body.get("type") == 5,
                "response_message_ephemeral": bool(data.get("flags", 0) & 64),
            },
            "resource": {"type": body.get("type"), "message": self._public(msg)},
        }
        return self._json(response)

    async def _followup(self, request: web.Request, app_id: str, token: str) -> web.Response:
        rec = self._find_interaction(token)
        body, files = await self._read_message_body(request)
        if err := self._token_error(rec):
            return err
        assert rec is not None
        if err := self._too_large(files, rec.payload["attachment_size_limit"]):
            return err
        if (
            rec.original is not None
            and rec.original["flags"] & 128
            and not rec.followups
            and not rec.deleted_original
        ):
            # Real Discord: the first followup after a defer replaces the loading message.
            msg = self._message(
                rec.channel_id, body, files, interaction=rec, message_id=int(rec.original["id"])
            )
            msg["flags"] = (rec.original["flags"] & 64) | (body.get("flags", 0) or 0)
            rec.original = msg
        else:
            msg = self._message(rec.channel_id, body, files, interaction=rec)
        self.messages[int(msg["id"])] = msg
        rec.followups.append(msg)
        return self._json(self._public(msg))

    async def _edit_webhook_message(
        self, request: web.Request, app_id: str, token: str, which: str
    ) -> web.Response:
        rec = self._find_interaction(token)
        body, files = await self._read_message_body(request)
        if err := self._token_error(rec):
            return err
        assert rec is not None
        if err := self._too_large(files, rec.payload["attachment_size_limit"]):
            return err
        target = rec.original if which == "@original" else self.messages.get(int(which))
        if target is None or rec.deleted_original and which == "@original":
            return self._error(404, 10008, "Unknown Message")
        edited = dict(target)
        if "content" in body:
            edited["content"] = body["content"] or ""
        if "embeds" in body:
            edited["embeds"] = body["embeds"] or []
        if "components" in body:
            edited["components"] = body["components"] or []
        if files or "attachments" in body:
            kept = [
                a
                for a in target["attachments"]
                if any(str(b.get("id")) == a["id"] for b in body.get("attachments", []))
            ]
            new = self._message(rec.channel_id, body, files, interaction=rec, message_id=int(target["id"]))
            edited["attachments"] = kept + new["attachments"]
            edited["_files"] = new["_files"]
        edited["flags"] = target["flags"] & ~128
        edited["edited_timestamp"] = _iso(time.time())
        edited["_seq"] = next(self._seq)
        self.messages[int(edited["id"])] = edited
        if (
            which == "@original"
            or int(which) == int(target["id"])
            and rec.original
            and rec.original["id"] == target["id"]
        ):
            rec.original = edited
        rec.edits.append({**body, "_seq": edited["_seq"], "_files": edited["_files"] if files else []})
        return self._json(self._public(edited))

    async def _get_webhook_message(
        self, request: web.Request, app_id: str, token: str, which: str
    ) -> web.Response:
        rec = self._find_interaction(token)
        if err := self._token_error(rec):
            return err
        assert rec is not None
        target = rec.original if which == "@original" else self.messages.get(int(which))
        if target is None:
            return self._error(404, 10008, "Unknown Message")
        return self._json(self._public(target))

    async def _delete_webhook_message(
        self, request: web.Request, app_id: str, token: str, which: str
    ) -> web.Response:
        rec = self._find_interaction(token)
        if err := self._token_error(rec):
            return err
        assert rec is not None
        if which == "@original":
            rec.deleted_original = True
            if rec.original is not None:
                self.messages.pop(int(rec.original["id"]), None)
        else:
            self.messages.pop(int(which), None)
        return web.Response(status=204)

    async def _create_message(self, request: web.Request, channel_id: str) -> web.Response:
        body, files = await self._read_message_body(request)
        if int(channel_id) != self.channel_id:
            return self._error(404, 10003, "Unknown Channel")
        if err := self._too_large(files, self.upload_limit):
            return err
        nonce = body.get("nonce")
        if nonce is not None and body.get("enforce_nonce"):
            seen = self._nonces.get(str(nonce))
            if seen and time.monotonic() - seen[1] < self.nonce_window_s and seen[0] in self.messages:
                self.nonce_hits.append(str(nonce))
                return self._json(self._public(self.messages[seen[0]]))
        msg = self._message(int(channel_id), body, files)
        if nonce is not None:
            msg["nonce"] = str(nonce)
            self._nonces[str(nonce)] = (int(msg["id"]), time.monotonic())
        self.messages[int(msg["id"])] = msg
        return self._json(self._public(msg))

    async def _list_messages(self, request: web.Request, channel_id: str) -> web.Response:
        """Channel history as Discord pages it: newest first; `after` takes the oldest ones after
        the id (still newest first in the page), `before` the newest ones before it."""
        q = request.query
        limit = max(1, min(int(q.get("limit", "50")), 100))
        ids = sorted(m for m, msg in self.messages.items() if int(msg["channel_id"]) == int(channel_id))
        if "after" in q:
            page = [m for m in ids if m > int(q["after"])][:limit]
        else:
            page = [m for m in ids if "before" not in q or m < int(q["before"])][-limit:]
        return self._json([self._public(self.messages[m]) for m in reversed(page)])

    async def _edit_message(self, request: web.Request, channel_id: str, message_id: str) -> web.Response:
        body, files = await self._read_message_body(request)
        target = self.messages.get(int(message_id))
        if target is None:
            return self._error(404, 10008, "Unknown Message")
        if err := self._too_large(files, self.upload_limit):
            return err
        edited = dict(target)
        if "content" in body:
            edited["content"] = body["content"] or ""
        if "components" in body:
            edited["components"] = body["components"] or []
        if files:
            edited["attachments"] = self._message(int(channel_id), body, files, message_id=int(message_id))[
                "attachments"
            ]
            edited["_files"] = [d for (_f, _n, d) in files]
        edited["edited_timestamp"] = _iso(time.time())
        edited["_seq"] = next(self._seq)
        edited.setdefault("_edits", [])
        edited["_edits"] = [*target.get("_edits", []), body.get("content")]
        self.messages[int(message_id)] = edited
        return self._json(self._public(edited))

    async def _get_message(self, request: web.Request, channel_id: str, message_id: str) -> web.Response:
        target = self.messages.get(int(message_id))
        if target is None:
            return self._error(404, 10008, "Unknown Message")
        return self._json(self._public(target))

    async def _add_reaction(
        self, request: web.Request, channel_id: str, message_id: str, emoji: str
    ) -> web.Response:
        if int(message_id) not in self.messages:
            return self._error(404, 10008, "Unknown Message")
        self.reactions.append((int(message_id), unquote(emoji), self.bot_user.id))
        return web.Response(status=204)

    async def _get_channel(self, request: web.Request, channel_id: str) -> web.Response:
        if int(channel_id) != self.channel_id:
            return self._error(404, 10003, "Unknown Channel")
        return self._json(self.guild_payload()["channels"][0])

    async def _attachment(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        self.downloads.append(key)
        if key not in self.attachments:
            return web.Response(status=404)
        content_type, data = self.attachments[key]
        return web.Response(body=data, headers={"Content-Type": content_type})
