"""Signed requests to the Bolt app's HTTP endpoint, built the way Slack builds them.

Slack signs `v0:{timestamp}:{body}` with the app's signing secret (HMAC-SHA256) and sends it in
`X-Slack-Signature` with `X-Slack-Request-Timestamp`; slash commands, shortcuts and view submissions
are form-encoded (interactive payloads as a `payload` JSON field), events are JSON.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp
from slack_sdk.signature import SignatureVerifier

from tests.slack.fake_slack import APP_ID, TEAM_ID

SIGNING_SECRET = "test-signing-secret-0123456789abcdef"


@dataclass
class Reply:
    status: int
    body: str
    elapsed_s: float

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class SlackSender:
    """Posts signed requests to a Bolt endpoint; `fake_base` hosts response_urls."""

    def __init__(
        self, session: aiohttp.ClientSession, url: str, fake_base: str, secret: str = SIGNING_SECRET
    ):
        self.session = session
        self.url = url
        self.fake_base = fake_base
        self.secret = secret
        self._ids = itertools.count(1)

    def next_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):06d}"

    async def post(
        self,
        body: str,
        content_type: str,
        *,
        secret: str | None = None,
        timestamp: int | None = None,
        extra_headers: dict[str, str] | None = None,
    ) -> Reply:
        ts = str(int(time.time()) if timestamp is None else timestamp)
        signature = SignatureVerifier(secret or self.secret).generate_signature(timestamp=ts, body=body)
        headers = {
            "Content-Type": content_type,
            "X-Slack-Request-Timestamp": ts,
            "X-Slack-Signature": signature,
            **(extra_headers or {}),
        }
        start = time.monotonic()
        async with self.session.post(self.url, data=body.encode(), headers=headers) as resp:
            text = await resp.text()
            return Reply(resp.status, text, time.monotonic() - start)

    async def slash_command(
        self,
        command: str,
        text: str,
        *,
        user_id: str = "UALICE01",
        channel_id: str = "CGENERAL1",
        trigger_id: str | None = None,
        **kwargs: Any,
    ) -> tuple[Reply, str]:
        """Returns the reply and the trigger_id used."""
        trigger_id = trigger_id or self.next_id("trig.")
        form = {
            "token": "legacy-verification-token",
            "team_id": TEAM_ID,
            "team_domain": "test",
            "channel_id": channel_id,
            "channel_name": "general",
            "user_id": user_id,
            "user_name": user_id.lower(),
            "command": command,
            "text": text,
            "api_app_id": APP_ID,
            "is_enterprise_install": "false",
            "response_url": f"{self.fake_base}/response/{trigger_id}",
            "trigger_id": trigger_id,
        }
        return await self.post(urlencode(form), "application/x-www-form-urlencoded", **kwargs), trigger_id

    async def event(
        self,
        event: dict[str, Any],
        *,
        event_id: str | None = None,
        retry_num: int | None = None,
        **kwargs: Any,
    ) -> tuple[Reply, str]:
        """Sends an Events API envelope; `retry_num` adds Slack's retry headers."""
        event_id = event_id or self.next_id("Ev")
        envelope = {
            "token": "legacy-verification-token",
            "team_id": TEAM_ID,
            "api_app_id": APP_ID,
            "event": event,
            "type": "event_callback",
            "event_id": event_id,
            "event_time": int(time.time()),
            "authorizations": [
                {"enterprise_id": None, "team_id": TEAM_ID, "user_id": "UBOT0001", "is_bot": True}
            ],
            "is_ext_shared_channel": False,
        }
        headers = dict(kwargs.pop("extra_headers", {}) or {})
        if retry_num is not None:
            headers["X-Slack-Retry-Num"] = str(retry_num)
            headers["X-Slack-Retry-Reason"] = "http_timeout"
        reply = await self.post(json.dumps(envelope), "application/json", extra_headers=headers, **kwargs)
        return reply, event_id

    async def interactive(self, payload: dict[str, Any], **kwargs: Any) -> Reply:
        body = urlencode({"payload": json.dumps(payload)})
        return await self.post(body, "application/x-www-form-urlencoded", **kwargs)

    async def message_shortcut(
        self,
        callback_id: str,
        message: dict[str, Any],
        *,
        user_id: str = "UALICE01",
        channel_id: str = "CGENERAL1",
        trigger_id: str | None = None,
    ) -> tuple[Reply, str]:
        trigger_id = trigger_id or self.next_id("trig.")
        payload = {
            "type": "message_action",
            "token": "legacy-verification-token",
            "action_ts": f"{time.time():.6f}",
            "team": {"id": TEAM_ID, "domain": "test"},
            "user": {"id": user_id, "name": user_id.lower(), "team_id": TEAM_ID},
            "channel": {"id": channel_id, "name": "general"},
            "is_enterprise_install": False,
            "callback_id": callback_id,
            "trigger_id": trigger_id,
            "response_url": f"{self.fake_base}/response/{trigger_id}",
            "message_ts": message["ts"],
            "message": message,
        }
        return await self.interactive(payload), trigger_id

    async def block_action(
        self, message: Any, action_id: str, *, user_id: str = "UALICE01", trigger_id: str | None = None
    ) -> tuple[Reply, str]:
        """A click on the button `action_id` of `message` (a FakeMessage), as Slack posts it."""
        trigger_id = trigger_id or self.next_id("trig.")
        payload = {
            "type": "block_actions",
            "user": {"id": user_id, "username": user_id.lower(), "name": user_id.lower(), "team_id": TEAM_ID},
            "api_app_id": APP_ID,
            "token": "legacy-verification-token",
            "container": {
                "type": "message",
                "message_ts": message.ts,
                "channel_id": message.channel,
                "is_ephemeral": False,
                **({"thread_ts": message.thread_ts} if message.thread_ts else {}),
            },
            "trigger_id": trigger_id,
            "team": {"id": TEAM_ID, "domain": "test"},
            "channel": {"id": message.channel, "name": "general"},
            "message": {
                "type": "message",
                "ts": message.ts,
                "text": message.text,
                "blocks": message.blocks or [],
            },
            "response_url": f"{self.fake_base}/response/{trigger_id}",
            "actions": [
                {
                    "action_id": action_id,
                    "block_id": "imagine_controls_0",
                    "value": action_id,
                    "type": "button",
                    "action_ts": f"{time.time():.6f}",
                }
            ],
            "is_enterprise_install": False,
        }
        return await self.interactive(payload), trigger_id

    async def view_submission(
        self, view: dict[str, Any], values: dict[str, Any], *, user_id: str = "UALICE01"
    ) -> Reply:
        payload = {
            "type": "view_submission",
            "team": {"id": TEAM_ID, "domain": "test"},
            "user": {"id": user_id, "name": user_id.lower(), "team_id": TEAM_ID},
            "api_app_id": APP_ID,
            "token": "legacy-verification-token",
            "trigger_id": self.next_id("trig."),
            "view": {
                "id": self.next_id("V"),
                "team_id": TEAM_ID,
                "type": "modal",
                "callback_id": view.get("callback_id"),
                "private_metadata": view.get("private_metadata", ""),
                "state": {"values": values},
                "hash": "1700000000.abcdef",
                "blocks": view.get("blocks", []),
            },
            "response_urls": [],
            "is_enterprise_install": False,
        }
        return await self.interactive(payload)
