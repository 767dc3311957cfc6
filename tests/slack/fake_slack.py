"""A fake of the Slack platform for tests: its Web API, file hosting and response URLs over loopback.

The real `slack_sdk.AsyncWebClient` (inside the real Bolt `AsyncApp`) talks to this server through
`base_url=f"{fake.base_url}/api/"`. It answers the methods the adapter uses the way Slack does,
including the parts that bite real bots:

- slack_sdk puts parameters in the query string (files.getUploadURLExternal/completeUploadExternal),
  a JSON body (chat.postMessage) or a form body (the rest): every call merges all three;
- files upload v2 is three steps (get an upload URL, POST the bytes there, complete), and the
  completion answer does not say in which message the file was shared: that shows up in files.info
  (`shares`), as on real Slack where sharing happens asynchronously;
- `url_private` downloads need the bot token as a Bearer header;
- a 429 with `Retry-After` can be injected per method; the default client does not retry it;
- a share can be made to show up late in files.info (`share_delay_s`), as Slack's sometimes do;
- `files.completeUploadExternal` takes Block Kit `blocks` for the share message (buttons), or can be
  made to refuse them (`refuse_upload_blocks`), and `chat.delete` removes the bot's messages.

Every call is recorded (`calls`) so tests assert on what the bot really sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

BOT_TOKEN = "xoxb-test-bot-token"
APP_TOKEN = "xapp-1-test-app-token"
BOT_USER_ID = "UBOT0001"
BOT_ID = "BBOT0001"
TEAM_ID = "T0TEST01"
APP_ID = "A0TEST01"


@dataclass
class ApiCall:
    method: str
    params: dict[str, Any]
    token: str | None
    status: int = 200


@dataclass
class FakeFile:
    id: str
    filename: str
    length: int
    data: bytes | None = None
    title: str | None = None
    mimetype: str = "application/octet-stream"
    shares: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    hosted: bool = False  # a file "posted by a user" that the fake serves at url_private
    shared_at: float = 0.0  # when files.info starts showing its shares (loop time)


@dataclass
class FakeMessage:
    channel: str
    ts: str
    text: str
    user: str
    blocks: list[Any] | None = None
    files: list[str] = field(default_factory=list)
    thread_ts: str | None = None
    updates: list[dict[str, Any]] = field(default_factory=list)
    history: list[str] = field(default_factory=list)  # every text it showed, first to last

    def __post_init__(self) -> None:
        self.history.append(self.text)


class FakeSlack:
    """Loopback fake of slack.com/api. Use `async with FakeSlack() as fake:`."""

    def __init__(self, *, token: str = BOT_TOKEN) -> None:
        self.token = token
        self.calls: list[ApiCall] = []
        self.messages: dict[tuple[str, str], FakeMessage] = {}
        self.ephemerals: list[dict[str, Any]] = []
        self.responses: list[dict[str, Any]] = []  # bodies POSTed to response_url
        self.files: dict[str, FakeFile] = {}
        self.views: list[dict[str, Any]] = []
        self.reactions: list[dict[str, Any]] = []
        # Conversations the bot is not a member of (a private channel, a DM between others)
        self.not_member: set[str] = set()
        # users.info answers; tests add admins here
        self.users: dict[str, dict[str, Any]] = {}
        self.base_url = ""
        self._rate_limits: dict[str, list[int]] = {}
        # files.info shows a share this long after files.completeUploadExternal made it.
        self.share_delay_s = 0.0
        self.refuse_upload_blocks = False
        self.deleted: list[FakeMessage] = []
        # Methods whose calls get no answer until `unstall()` (a bot dying mid-call never sees one).
        self.stalled: set[str] = set()
        self._unstalled = asyncio.Event()
        # Uploads (the PUT of a file's bytes) that wait, and are then carried out, until `release_uploads()`.
        self.uploads_held = False
        self.upload_waiting = asyncio.Event()
        self._uploads_released = asyncio.Event()
        self._ts = itertools.count(100)
        self._ids = itertools.count(1)
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        # Socket Mode: the app's websocket, and the envelope ids it acknowledged (with their payloads)
        self._socket: web.WebSocketResponse | None = None
        self.socket_acks: dict[str, Any] = {}

    # -- lifecycle ---------------------------------------------------------------------------------

    async def __aenter__(self) -> FakeSlack:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_post("/upload/{file_id}", self._upload)
        app.router.add_get("/files-pri/{file_id}/{name}", self._download)
        app.router.add_post("/response/{key}", self._response_url)
        app.router.add_get("/socket", self._socket_mode)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.unstall()
        self.release_uploads()
        if self._socket is not None:
            await self._socket.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_url(self) -> str:
        # The trailing slash matters: slack_sdk joins base_url + method name.
        return f"{self.base_url}/api/"

    # -- test controls -----------------------------------------------------------------------------

    def stall(self, method: str) -> None:
        """Calls to `method` get no answer until `unstall()`, and are never carried out."""
        self._unstalled.clear()
        self.stalled.add(method)

    def unstall(self) -> None:
        self.stalled.clear()
        self._unstalled.set()

    def hold_uploads(self) -> None:
        """File uploads wait for `release_uploads()` and are then carried out: a post in flight."""
        self.uploads_held = True
        self._uploads_released.clear()

    def release_uploads(self) -> None:
        self.uploads_held = False
        self._uploads_released.set()

    def rate_limit(self, method: str, times: int = 1, retry_after: int = 0) -> None:
        """The next `times` calls of `method` get HTTP 429 with `Retry-After: retry_after`."""
        self._rate_limits.setdefault(method, []).extend([retry_after] * times)

    def add_user(
        self, user_id: str, *, is_admin: bool = False, is_owner: bool = False, name: str = ""
    ) -> None:
        self.users[user_id] = {
            "id": user_id,
            "team_id": TEAM_ID,
            "name": name or user_id.lower(),
            "real_name": name or user_id,
            "is_admin": is_admin,
            "is_owner": is_owner,
            "is_bot": False,
            "profile": {"display_name": name or user_id.lower()},
        }

    def host_file(self, filename: str, data: bytes, mimetype: str = "image/png") -> dict[str, Any]:
        """Register a file "uploaded by a user"; returns the file object Slack puts in message events."""
        file_id = f"FUSR{next(self._ids):05d}"
        self.files[file_id] = FakeFile(
            id=file_id, filename=filename, length=len(data), data=data, mimetype=mimetype, hosted=True
        )
        return self._file_object(self.files[file_id])

    def calls_to(self, method: str) -> list[ApiCall]:
        return [c for c in self.calls if c.method == method and c.status == 200]

    async def wait_for(self, predicate: Callable[[], Any], limit_s: float = 60.0) -> Any:
        """Wait until `predicate()` is truthy; re-checked on every request the fake serves and every
        50 ms (for predicates on other state, such as the core's)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        while True:
            value = predicate()
            if value:
                return value
            remaining = deadline - loop.time()
            if remaining <= 0:
                methods = [c.method for c in self.calls]
                raise AssertionError(f"condition not met within {limit_s}s; calls so far: {methods}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(0.05, remaining)):
                    await self._changed.wait()

    def buttons(self, msg: FakeMessage) -> list[str]:
        """The action ids of a message's buttons, in order."""
        return [
            e["action_id"]
            for b in msg.blocks or []
            if b.get("type") == "actions"
            for e in b.get("elements", [])
        ]

    def uploaded_files(self) -> list[FakeFile]:
        return [f for f in self.files.values() if not f.hosted and f.data is not None and f.shares]

    # -- HTTP handlers -----------------------------------------------------------------------------

    async def _notify(self) -> None:
        self._changed.set()

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params: dict[str, Any] = dict(request.query)
        if request.can_read_body:
            ctype = request.content_type
            if ctype == "application/json":
                params.update(await request.json())
            elif ctype in ("application/x-www-form-urlencoded", "multipart/form-data"):
                params.update({k: v for k, v in (await request.post()).items() if isinstance(v, str)})
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else params.get("token")
        if method in self.stalled:
            self.calls.append(ApiCall(method, params, token, status=0))
            await self._notify()
            await self._unstalled.wait()
            return web.json_response({"ok": False, "error": "fatal_error"})
        pending = self._rate_limits.get(method)
        if pending:
            retry_after = pending.pop(0)
            self.calls.append(ApiCall(method, params, token, status=429))
            await self._notify()
            return web.json_response(
                {"ok": False, "error": "ratelimited"}, status=429, headers={"Retry-After": str(retry_after)}
            )
        self.calls.append(ApiCall(method, params, token))
        try:
            if method == "apps.connections.open":
                # Socket Mode: the only method called with the app-level token
                if token != APP_TOKEN:
                    return web.json_response({"ok": False, "error": "invalid_auth"})
                return web.json_response({"ok": True, "url": f"ws://{request.host}/socket"})
            if token != self.token:
                return web.json_response({"ok": False, "error": "invalid_auth"})
            handler = getattr(self, "_m_" + method.replace(".", "_"), None)
            if handler is None:
                return web.json_response({"ok": False, "error": "unknown_method"})
            return web.json_response(handler(params))
        finally:
            await self._notify()

    async def _upload(self, request: web.Request) -> web.Response:
        f = self.files.get(request.match_info["file_id"])
        if f is None:
            return web.Response(status=404, text="unknown upload url")
        f.data = await request.read()
        if self.uploads_held:
            self.upload_waiting.set()
            await self._uploads_released.wait()
        await self._notify()
        return web.Response(text=f"OK - {len(f.data)}")

    async def _download(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            # Real Slack answers an HTML login page with 200; a 403 keeps test failures readable.
            return web.Response(status=403, text="missing or wrong bot token")
        f = self.files.get(request.match_info["file_id"])
        if f is None or f.data is None:
            return web.Response(status=404)
        return web.Response(body=f.data, content_type=f.mimetype)

    async def _socket_mode(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self._socket = ws
        await ws.send_json({"type": "hello", "num_connections": 1, "connection_info": {"app_id": APP_ID}})
        await self._notify()
        async for msg in ws:
            if msg.type == web.WSMsgType.TEXT:
                data = json.loads(msg.data)
                self.socket_acks[data.get("envelope_id")] = data.get("payload")
                await self._notify()
        self._socket = None
        return ws

    @property
    def socket_connected(self) -> bool:
        return self._socket is not None and not self._socket.closed

    async def socket_send(self, kind: str, payload: dict[str, Any]) -> str:
        """Push one Socket Mode envelope (kind: slash_commands, events_api, interactive)."""
        assert self._socket is not None, "no Socket Mode connection"
        envelope_id = f"env-{next(self._ids):05d}"
        await self._socket.send_json(
            {"envelope_id": envelope_id, "type": kind, "payload": payload, "accepts_response_payload": True}
        )
        return envelope_id

    async def _response_url(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.responses.append({"key": request.match_info["key"], **body})
        await self._notify()
        return web.Response(text="ok")

    # -- Web API methods ---------------------------------------------------------------------------

    def _new_ts(self) -> str:
        return f"1700000000.{next(self._ts):06d}"

    @staticmethod
    def _json_param(value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    def _m_auth_test(self, p: dict[str, Any]) -> dict[str, Any]:
        return {
            "ok": True,
            "url": "https://test.slack.com/",
            "team": "Test Team",
            "user": "imagine",
            "team_id": TEAM_ID,
            "user_id": BOT_USER_ID,
            "bot_id": BOT_ID,
            "is_enterprise_install": False,
        }

    def _m_chat_postMessage(self, p: dict[str, Any]) -> dict[str, Any]:
        channel = p.get("channel")
        if not channel:
            return {"ok": False, "error": "channel_not_found"}
        if channel in self.not_member:
            return {"ok": False, "error": "not_in_channel"}
        if not p.get("text") and not p.get("blocks"):
            return {"ok": False, "error": "no_text"}
        ts = self._new_ts()
        msg = FakeMessage(
            channel,
            ts,
            p.get("text", ""),
            BOT_USER_ID,
            self._json_param(p.get("blocks")),
            thread_ts=p.get("thread_ts"),
        )
        self.messages[(channel, ts)] = msg
        return {
            "ok": True,
            "channel": channel,
            "ts": ts,
            "message": {"text": msg.text, "ts": ts, "user": BOT_USER_ID},
        }

    def _m_chat_update(self, p: dict[str, Any]) -> dict[str, Any]:
        msg = self.messages.get((p.get("channel"), p.get("ts")))
        if msg is None:
            return {"ok": False, "error": "message_not_found"}
        if "text" in p:
            msg.text = p["text"]
            msg.history.append(msg.text)
        if "blocks" in p:
            msg.blocks = self._json_param(p["blocks"])
        msg.updates.append(dict(p))
        return {"ok": True, "channel": msg.channel, "ts": msg.ts, "text": msg.text}

    def _m_chat_postEphemeral(self, p: dict[str, Any]) -> dict[str, Any]:
        if not p.get("channel") or not p.get("user"):
            return {"ok": False, "error": "invalid_arguments"}
        if p["channel"] in self.not_member:
            return {"ok": False, "error": "not_in_channel"}
        self.ephemerals.append(dict(p))
        return {"ok": True, "message_ts": self._new_ts()}

    def _m_reactions_add(self, p: dict[str, Any]) -> dict[str, Any]:
        if (p.get("channel"), p.get("timestamp")) not in self.messages:
            return {"ok": False, "error": "message_not_found"}
        self.reactions.append(dict(p))
        return {"ok": True}

    def _m_files_getUploadURLExternal(self, p: dict[str, Any]) -> dict[str, Any]:
        if not p.get("filename") or not str(p.get("length", "")).isdigit():
            return {"ok": False, "error": "invalid_arguments"}
        file_id = f"FBOT{next(self._ids):05d}"
        self.files[file_id] = FakeFile(id=file_id, filename=p["filename"], length=int(p["length"]))
        return {"ok": True, "upload_url": f"{self.base_url}/upload/{file_id}", "file_id": file_id}

    def _m_files_completeUploadExternal(self, p: dict[str, Any]) -> dict[str, Any]:
        entries = self._json_param(p.get("files") or "[]")
        found = []
        for entry in entries:
            f = self.files.get(entry.get("id"))
            if f is None or f.data is None:
                return {"ok": False, "error": "file_not_found"}
            if len(f.data) != f.length:
                return {"ok": False, "error": "file_upload_size_mismatch"}
            f.title = entry.get("title")
            f.mimetype = "image/png" if f.filename.endswith(".png") else f.mimetype
            found.append(f)
        channel = p.get("channel_id")
        if channel in self.not_member:
            return {"ok": False, "error": "not_in_channel"}
        blocks = None if p.get("initial_comment") else self._json_param(p.get("blocks"))
        if blocks is not None and self.refuse_upload_blocks:
            return {"ok": False, "error": "invalid_blocks"}
        if channel:
            ts = self._new_ts()
            # A message of blocks reads as their text (what Slack shows in notifications and search).
            shown = p.get("initial_comment") or "\n".join(
                b["text"]["text"] for b in blocks or [] if b.get("type") == "section"
            )
            self.messages[(channel, ts)] = FakeMessage(
                channel,
                ts,
                shown,
                BOT_USER_ID,
                blocks,
                files=[f.id for f in found],
                thread_ts=p.get("thread_ts"),
            )
            kind = "public" if channel.startswith("C") else "private"
            for f in found:
                f.shares = {kind: {channel: [{"ts": ts, "channel_name": channel}]}}
                f.shared_at = asyncio.get_running_loop().time() + self.share_delay_s
        # Like Slack: the answer lists the files but not (yet) where they were shared.
        return {"ok": True, "files": [{"id": f.id, "title": f.title} for f in found]}

    def _m_chat_delete(self, p: dict[str, Any]) -> dict[str, Any]:
        msg = self.messages.pop((p.get("channel"), p.get("ts")), None)
        if msg is None:
            return {"ok": False, "error": "message_not_found"}
        self.deleted.append(msg)
        return {"ok": True, "channel": msg.channel, "ts": msg.ts}

    def _m_files_info(self, p: dict[str, Any]) -> dict[str, Any]:
        f = self.files.get(p.get("file"))
        if f is None:
            return {"ok": False, "error": "file_not_found"}
        return {"ok": True, "file": self._file_object(f)}

    def _m_views_open(self, p: dict[str, Any]) -> dict[str, Any]:
        if not p.get("trigger_id"):
            return {"ok": False, "error": "invalid_trigger_id"}
        view = self._json_param(p.get("view"))
        self.views.append({"trigger_id": p["trigger_id"], "view": view})
        return {"ok": True, "view": {"id": f"V{next(self._ids):05d}", **view}}

    def _m_conversations_open(self, p: dict[str, Any]) -> dict[str, Any]:
        """A DM with one user: its channel id (D...), the same each time, as on Slack."""
        users = str(p.get("users") or "")
        if not users or "," in users:
            return {"ok": False, "error": "invalid_arguments" if not users else "not_implemented"}
        return {"ok": True, "channel": {"id": f"D{users}"}}

    def _m_users_info(self, p: dict[str, Any]) -> dict[str, Any]:
        user = self.users.get(p.get("user"))
        if user is None:
            return {"ok": False, "error": "user_not_found"}
        return {"ok": True, "user": user}

    def _file_object(self, f: FakeFile) -> dict[str, Any]:
        filetype = f.filename.rsplit(".", 1)[-1].lower() if "." in f.filename else ""
        obj: dict[str, Any] = {
            "id": f.id,
            "name": f.filename,
            "title": f.title or f.filename,
            "mimetype": f.mimetype,
            "filetype": filetype,
            "size": f.length,
            "url_private": f"{self.base_url}/files-pri/{f.id}/{f.filename}",
            "url_private_download": f"{self.base_url}/files-pri/{f.id}/{f.filename}",
        }
        if f.shares and asyncio.get_running_loop().time() >= f.shared_at:
            obj["shares"] = f.shares
        return obj
