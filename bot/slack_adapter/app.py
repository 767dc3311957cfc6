"""The Slack adapter: a Bolt `AsyncApp` whose listeners translate Slack requests into core calls,
and a `Delivery` that turns the core's job reports into Slack messages and file uploads.

Rules kept here (see shared notes): `ack()` comes first and the work runs after it (Bolt `lazy=`
listeners for commands, shortcuts, buttons and views; events are acknowledged by Bolt before the
listener runs); every job carries an idempotency key from Slack (`trigger_id`, `event_id`, view id)
so a retried delivery never starts a second job; buttons and reactions resolve to job rows through
the core, never through memory; users see short messages, tracebacks stay in the log; the bot token
is only ever sent to Slack's file hosts (`[slack] file_hosts`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import aiohttp
from slack_bolt.async_app import AsyncApp
from slack_bolt.logger.messages import warning_client_prioritized_and_token_skipped
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.web.async_slack_response import AsyncSlackResponse

from bot.core import controls
from bot.core.api import (
    REACTION_ACTIONS,
    Actor,
    BadParameters,
    ChannelDefaults,
    CoreError,
    ImageService,
    JobView,
    ModelListing,
    Place,
    PlaceRules,
    ResultImage,
)
from bot.core.operations import remix_text
from bot.slack_adapter import admin, messages
from bot.slack_adapter.attachments import (
    AttachmentError,
    SlackFile,
    download,
    pick_image,
    pick_image_and_mask,
)
from bot.slack_adapter.config import SlackConfig
from bot.slack_adapter.status import DONE, QUEUED, RUNNING, StatusBoard, job_channel

log = logging.getLogger("bot.slack")

PLATFORM = "slack"
INPAINT_VIEW_CALLBACK = "imagine_inpaint_modal"
REMIX_VIEW_CALLBACK = "imagine_remix_modal"
PROMPT_BLOCK = "prompt"
IMAGE_BLOCK = "image"
# A Slack plain_text_input holds at most 3000 characters; prompts beyond 1000 are never useful to a
# CLIP text encoder (77 tokens) and the core rejects them anyway.
MAX_PROMPT_CHARS = 1000
# files.info is polled for the message that shows an uploaded file: Slack shares files
# asynchronously, usually within a second (~7.75 s at most here), then in the background for about
# nine minutes more (a share that shows up late still gets its message id, so reactions on it work);
# after a restart a reaction on it is resolved by its files (`SlackAdapter.resolve_late_share`).
SHARE_POLL_DELAYS_S = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
LATE_SHARE_DELAYS_S = (8.0, 15.0, 30.0, 60.0, 120.0, 300.0)
# Web API errors meaning "the bot cannot post in this conversation" (private channel it is not in,
# a DM between other people).
CANNOT_POST = frozenset({"not_in_channel", "channel_not_found", "is_archived", "restricted_action"})
# The bot's own mention that starts an app_mention's text.
_LEADING_MENTION = re.compile(r"^\s*<@[UW][A-Z0-9]+(?:\|[^>]*)?>[\s,:]*")

Tell = Callable[[str], Awaitable[None]]


def message_id(channel: str, ts: str) -> str:
    """A Slack message is unique by channel and ts; the core stores this string per result."""
    return f"{channel}:{ts}"


class SlackAdapter:
    def __init__(
        self,
        service: ImageService,
        cfg: SlackConfig,
        client: AsyncWebClient,
        http: aiohttp.ClientSession,
    ) -> None:
        self.service = service
        self.cfg = cfg
        self.client = client
        self.http = http
        self.status = StatusBoard(
            client, cfg.progress_interval_s, service.remember_delivery, blocks=messages.status_blocks
        )
        self.delivery = SlackDelivery(self)
        self._admin_cache: dict[str, tuple[float, bool]] = {}

    # -- the Bolt app --------------------------------------------------------------------------------

    def build_app(self, signing_secret: str, *, socket_mode: bool = False) -> AsyncApp:
        bolt_log = logging.getLogger("bot.slack.bolt")
        if not any(isinstance(f, _ClientGivenFilter) for f in bolt_log.filters):
            bolt_log.addFilter(_ClientGivenFilter())
        app = AsyncApp(
            client=self.client,
            signing_secret=signing_secret,
            name="imagine-bot",
            logger=bolt_log,
            # Socket Mode requests are not signed; the websocket itself is authenticated.
            request_verification_enabled=not socket_mode,
        )
        cfg = self.cfg
        app.command(cfg.imagine_command)(ack=self._ack, lazy=[self.imagine_command])
        app.command(cfg.admin_command)(ack=self._ack, lazy=[self.admin_command])
        app.shortcut(cfg.inpaint_shortcut_callback_id)(ack=self._ack, lazy=[self.open_inpaint_modal])
        app.view(INPAINT_VIEW_CALLBACK)(ack=self.ack_inpaint_view, lazy=[self.inpaint_view])
        app.action(re.compile(r"^imagine:"))(ack=self._ack, lazy=[self.on_action])
        app.view(REMIX_VIEW_CALLBACK)(ack=self.ack_remix_view, lazy=[self.remix_view])
        app.event("app_mention")(self.on_mention)
        app.event("reaction_added")(self.on_reaction)
        app.error(self._on_error)
        return app

    @staticmethod
    async def _ack(ack: Any) -> None:
        await ack()

    @staticmethod
    async def _on_error(error: Exception, body: Mapping[str, Any]) -> None:
        log.error("slack: unhandled error for %s", body.get("type") or body.get("command"), exc_info=error)

    # -- who and where -------------------------------------------------------------------------------

    async def actor(self, user_id: str, display_name: str = "") -> Actor:
        return Actor(PLATFORM, user_id, display_name or user_id, await self.is_admin(user_id))

    async def is_admin(self, user_id: str) -> bool:
        if user_id in self.cfg.admin_user_ids:
            return True
        if not self.cfg.workspace_admins_are_admins:
            return False
        cached = self._admin_cache.get(user_id)
        now = time.monotonic()
        if cached and cached[0] > now:
            return cached[1]
        try:
            resp = await self.client.users_info(user=user_id)
            user = resp["user"]
            value = bool(user.get("is_admin") or user.get("is_owner") or user.get("is_primary_owner"))
        except SlackApiError as e:
            # Without users:read (or for an unknown user) nobody is a workspace admin: fail closed.
            log.warning(
                "slack: users.info %s failed (%s); treating as not admin", user_id, e.response.get("error")
            )
            value = False
        self._admin_cache[user_id] = (now + self.cfg.admin_cache_s, value)
        return value

    def ephemeral(self, channel: str, user: str, thread_ts: str | None = None) -> Tell:
        async def tell(text: str) -> None:
            try:
                await self.client.chat_postEphemeral(
                    channel=channel, user=user, text=text, thread_ts=thread_ts
                )
            except SlackApiError as e:
                log.warning("slack: could not tell %s in %s: %s", user, channel, e.response.get("error"))

        return tell

    @staticmethod
    def via_respond(respond: Any) -> Tell:
        async def tell(text: str) -> None:
            try:
                await respond(text=text, response_type="ephemeral", replace_original=False)
            except Exception:  # a dead response_url must not hide the original problem
                log.warning("slack: response_url reply failed", exc_info=True)

        return tell

    async def announce(self, job: JobView, actor: Actor, tell: Tell) -> None:
        """After a successful submission: show the status message, once per job. If the bot may not
        post in this channel, the result could not be posted either: cancel (the core refunds)."""
        if not job.created or job.done:
            return
        try:
            position = await self.service.queue_position(job.id)
        except Exception:  # the status shows without it; the core reports it shortly
            log.warning("slack: job %s: queue position unavailable", job.id, exc_info=True)
            position = None
        if job.private:
            # Private mode: no status message in the channel; one private note, the result in a DM.
            await tell(messages.queued_text(job, position) + " " + messages.PRIVATE_NOTE)
            return
        error = await self.status.show(job, QUEUED, messages.queued_text(job, position), edit=False)
        if error not in CANNOT_POST:
            return
        try:
            cancelled = (await self.service.cancel(actor, job.id)).state == "cancelled"
        except Exception:
            log.exception("slack: cancelling job %s failed", job.id)
            cancelled = False
        await tell(messages.cannot_post_text(cancelled))

    # -- /imagine ------------------------------------------------------------------------------------

    async def imagine_command(self, command: Mapping[str, Any], respond: Any) -> None:
        text = messages.plain_text(command.get("text") or "").strip()
        user, channel = command["user_id"], command["channel_id"]
        tell = self.via_respond(respond)
        place = Place(PLATFORM, command.get("team_id"), channel)
        try:
            word = text.lower()
            if word in ("", "help", "--help"):
                await tell(
                    messages.imagine_help(
                        self.cfg.imagine_command, await self._listing(place), await self._rules(place)
                    )
                )
                return
            if word == "models":
                await tell(messages.models_text(await self.service.models(place), self.cfg.imagine_command))
                return
            actor = await self.actor(user, command.get("user_name", ""))
            if word == "quota":
                await tell(messages.quota_text(await self.service.quota(actor, place)))
                return
            if word == "history":
                await tell(messages.history_text(await self.service.history(actor, limit=10)))
                return
            job = await self.service.imagine(
                actor,
                place,
                text,
                None,
                idempotency_key=f"cmd:{command['trigger_id']}",
                delivery={"channel": channel, "user": user, "response_url": command.get("response_url")},
            )
        except Exception as e:
            await tell(messages.error_text(e))
            return
        await self.announce(job, actor, tell)

    async def _rules(self, place: Place) -> PlaceRules | None:
        """The channel's rules for help texts; None when the core can't say now."""
        try:
            return await self.service.place_rules(place)
        except CoreError:
            return None

    async def _listing(self, place: Place) -> ModelListing | None:
        """The models for help texts; None when the core can't say now (the help still helps)."""
        try:
            return await self.service.models(place)
        except CoreError:
            return None

    # -- mentions: "@imagine inpaint <prompt>" with an image, "@imagine <prompt>" --------------------

    async def on_mention(self, event: Mapping[str, Any], body: Mapping[str, Any]) -> None:
        user, channel = event.get("user"), event.get("channel")
        if not user or not channel:
            return
        thread_ts = event.get("thread_ts")
        tell = self.ephemeral(channel, user, thread_ts)
        text = messages.plain_text(_LEADING_MENTION.sub("", event.get("text") or "")).strip()
        verb, _, rest = text.partition(" ")
        key = f"event:{body.get('event_id')}"
        place = Place(PLATFORM, body.get("team_id"), channel)
        delivery = {"channel": channel, "user": user, "thread_ts": thread_ts}
        files = event.get("files") or []
        limit = self.cfg.max_attachment_bytes
        try:
            actor = await self.actor(user)
            if verb.lower() == "inpaint":
                image, mask = pick_image_and_mask(files, limit)
                job = await self.submit_inpaint(actor, place, rest.strip(), image, mask, key, delivery)
            elif len(files) == 2 and verb.lower() not in ("imagine", "draw"):
                # An image and its mask with a bare prompt: the user obviously means inpainting.
                image, mask = pick_image_and_mask(files, limit)
                job = await self.submit_inpaint(actor, place, text, image, mask, key, delivery)
            elif verb.lower() in ("imagine", "draw") or files:
                prompt = rest if verb.lower() in ("imagine", "draw") else text
                if files:
                    # An image with a prompt: start from it (image-to-image at --strength).
                    start = pick_image(files, limit)
                    job = await self.submit_image(actor, place, prompt, start, key, delivery)
                else:
                    job = await self.service.imagine(
                        actor, place, prompt, None, idempotency_key=key, delivery=delivery
                    )
            else:
                await tell(
                    messages.imagine_help(
                        self.cfg.imagine_command, await self._listing(place), await self._rules(place)
                    )
                )
                return
        except AttachmentError as e:
            await tell(f":frame_with_picture: {e.message}")
            return
        except Exception as e:
            await tell(messages.error_text(e))
            return
        await self.announce(job, actor, tell)

    async def _download(self, f: SlackFile) -> bytes:
        return await download(
            self.http, self.client.token or "", f, self.cfg.max_attachment_bytes, self.cfg.file_hosts
        )

    async def submit_image(
        self, actor: Actor, place: Place, prompt: str, image: SlackFile, key: str, delivery: Mapping[str, Any]
    ) -> JobView:
        if not prompt.strip():
            raise AttachmentError(
                "Say what to make of the image: `@imagine a watercolour version --strength 0.6`."
            )
        data = await self._download(image)
        return await self.service.image_to_image(
            actor, place, prompt, data, None, idempotency_key=key, delivery=delivery
        )

    async def submit_inpaint(
        self,
        actor: Actor,
        place: Place,
        prompt: str,
        image: SlackFile,
        mask: SlackFile | None,
        key: str,
        delivery: Mapping[str, Any],
    ) -> JobView:
        if not prompt:
            raise AttachmentError("Say what to paint: `@imagine inpaint a red hat`.")
        image_bytes = await self._download(image)
        mask_bytes = await self._download(mask) if mask else None
        return await self.service.inpaint(
            actor, place, prompt, image_bytes, mask_bytes, None, idempotency_key=key, delivery=delivery
        )

    # -- the "Inpaint…" message shortcut and its modal ------------------------------------------------

    async def open_inpaint_modal(self, shortcut: Mapping[str, Any], respond: Any) -> None:
        tell = self.via_respond(respond)
        message = shortcut.get("message") or {}
        channel = (shortcut.get("channel") or {}).get("id")
        try:
            image, mask = pick_image_and_mask(message.get("files") or [], self.cfg.max_attachment_bytes)
        except AttachmentError as e:
            await tell(f":frame_with_picture: {e.message}")
            return
        meta = {
            "channel": channel,
            "thread_ts": message.get("thread_ts"),
            "image": image.to_json(),
            "mask": mask.to_json() if mask else None,
        }
        try:
            await self.client.views_open(trigger_id=shortcut["trigger_id"], view=inpaint_modal(meta))
        except SlackApiError as e:
            log.warning("slack: views.open failed: %s", e.response.get("error"))
            await tell(":warning: I could not open the inpaint dialog; please try again.")

    async def ack_inpaint_view(self, ack: Any, view: Mapping[str, Any]) -> None:
        prompt = _view_prompt(view)
        if not prompt:
            await ack(
                response_action="errors", errors={PROMPT_BLOCK: "Describe what to paint in the masked area."}
            )
            return
        await ack()

    async def inpaint_view(self, view: Mapping[str, Any], body: Mapping[str, Any]) -> None:
        user = body["user"]["id"]
        try:
            # Written by open_inpaint_modal; it comes back through Slack unchanged, but a view from an
            # older version of the bot (or a hand-made request) must get an answer, not a traceback.
            meta = json.loads(view.get("private_metadata") or "{}")
            channel = meta["channel"]
            image = SlackFile(**meta["image"])
            mask = SlackFile(**meta["mask"]) if meta.get("mask") else None
        except (ValueError, KeyError, TypeError):
            log.warning("slack: inpaint view %s has unusable metadata", view.get("id"))
            return
        tell = self.ephemeral(channel, user, meta.get("thread_ts"))
        place = Place(PLATFORM, (body.get("team") or {}).get("id"), channel)
        delivery = {"channel": channel, "user": user, "thread_ts": meta.get("thread_ts")}
        try:
            actor = await self.actor(user, body["user"].get("name", ""))
            job = await self.submit_inpaint(
                actor, place, _view_prompt(view), image, mask, f"view:{view['id']}", delivery
            )
        except AttachmentError as e:
            await tell(f":frame_with_picture: {e.message}")
            return
        except Exception as e:
            await tell(messages.error_text(e))
            return
        await self.announce(job, actor, tell)

    # -- reactions on results -------------------------------------------------------------------------

    async def on_reaction(self, event: Mapping[str, Any], body: Mapping[str, Any]) -> None:
        item = event.get("item") or {}
        # "+1::skin-tone-2" style names carry a modifier; ours have none.
        name = (event.get("reaction") or "").split("::")[0]
        if item.get("type") != "message" or name not in REACTION_ACTIONS:
            return
        user, channel, ts = event.get("user"), item.get("channel"), item.get("ts")
        if not user or not channel or not ts:
            return
        place = Place(PLATFORM, body.get("team_id"), channel)
        tell = self.ephemeral(channel, user)
        key = f"event:{body.get('event_id')}"
        delivery = {"channel": channel, "user": user}
        try:
            actor = await self.actor(user)
            job = await self.service.react(
                actor, place, message_id(channel, ts), name, idempotency_key=key, delivery=delivery
            )
            if job is None and await self.resolve_late_share(channel, ts):
                job = await self.service.react(
                    actor, place, message_id(channel, ts), name, idempotency_key=key, delivery=delivery
                )
        except Exception as e:
            await tell(messages.error_text(e))
            return
        if job is not None:
            await self.announce(job, actor, tell)

    async def resolve_late_share(self, channel: str, ts: str) -> bool:
        """A message the core does not know may show a result whose share Slack reported late (or
        after a restart ended the look for it): ask Slack where the files of this channel's
        unattached results were shared, and record the one shown in `ts`."""
        for job in await self.service.unattached_results(PLATFORM, channel):
            files = [f for f in (job.delivery.get("result_files") or "").split(",") if f]
            if not files:
                continue
            try:
                info = (await self.client.files_info(file=files[0]))["file"]
            except SlackApiError as e:
                log.info("slack: files.info %s failed: %s", files[0], e.response.get("error"))
                continue
            if _ts_in_shares(info.get("shares") or {}, channel) == ts:
                log.info("slack: job %s: its late share %s found through its files", job.id, ts)
                await self.service.attach_result_message(job.id, message_id(channel, ts), channel_id=channel)
                return True
        return False

    # -- buttons and the remix dialog ---------------------------------------------------------------

    async def on_action(self, body: Mapping[str, Any], action: Mapping[str, Any], respond: Any) -> None:
        pressed = controls.parse(str(action.get("action_id") or ""))
        user = (body.get("user") or {}).get("id")
        container = body.get("container") or {}
        channel = (body.get("channel") or {}).get("id") or container.get("channel_id")
        if pressed is None or not user or not channel:
            return
        tell = self.ephemeral(channel, user, container.get("thread_ts"))
        place = Place(PLATFORM, (body.get("team") or {}).get("id"), channel)
        ts = container.get("message_ts")
        try:
            actor = await self.actor(user, (body.get("user") or {}).get("name", ""))
            if pressed.op == "cancel":
                await self._cancel(actor, place, pressed.job_id, tell)
                return
            if pressed.op == "remix":
                await self._open_remix(body, pressed, channel, ts, tell)
                return
            job = await controls.press(
                self.service,
                actor,
                place,
                pressed,
                message_id=message_id(channel, ts) if ts else None,
                idempotency_key=f"action:{body.get('trigger_id')}",
                delivery={"channel": channel, "user": user, "thread_ts": container.get("thread_ts")},
            )
        except Exception as e:
            await tell(messages.error_text(e))
            return
        log.info("slack: button %s by %s -> job %s (%s)", pressed.op, user, job.id, job.kind)
        await self.announce(job, actor, tell)

    async def _cancel(self, actor: Actor, place: Place, job_id: int, tell: Tell) -> None:
        job = await self.service.cancel(actor, job_id, place)
        if job.state != "cancelled":
            await tell(messages.not_cancelled_text(job))
            return
        log.info("slack: job %s cancelled by %s", job.id, actor.user_id)
        await self.status.show(job, DONE, messages.cancelled_text(job))

    async def _open_remix(
        self, body: Mapping[str, Any], pressed: controls.Pressed, channel: str, ts: str | None, tell: Tell
    ) -> None:
        job = await self.service.get_job(pressed.job_id)
        meta = {"job": pressed.job_id, "channel": channel, "ts": ts,
                "thread_ts": (body.get("container") or {}).get("thread_ts")}  # fmt: skip
        try:
            await self.client.views_open(trigger_id=body["trigger_id"], view=remix_modal(job, meta))
        except SlackApiError as e:
            log.warning("slack: views.open failed: %s", e.response.get("error"))
            await tell(":warning: I could not open the remix dialog; please try again.")

    async def ack_remix_view(self, ack: Any, view: Mapping[str, Any]) -> None:
        if not _view_prompt(view):
            await ack(response_action="errors", errors={PROMPT_BLOCK: "Write the prompt to remix with."})
            return
        await ack()

    async def remix_view(self, view: Mapping[str, Any], body: Mapping[str, Any]) -> None:
        user = body["user"]["id"]
        try:
            meta = json.loads(view.get("private_metadata") or "{}")
            channel, job_id = meta["channel"], int(meta["job"])
        except (ValueError, KeyError, TypeError):
            log.warning("slack: remix view %s has unusable metadata", view.get("id"))
            return
        tell = self.ephemeral(channel, user, meta.get("thread_ts"))
        place = Place(PLATFORM, (body.get("team") or {}).get("id"), channel)
        values = ((view.get("state") or {}).get("values") or {}).get(IMAGE_BLOCK) or {}
        chosen = ((values.get(IMAGE_BLOCK) or {}).get("selected_option") or {}).get("value") or "1"
        try:
            if not chosen.isdigit():
                raise BadParameters("image", f"The image to start from is a number, not {chosen!r}.")
            actor = await self.actor(user, body["user"].get("name", ""))
            job = await self.service.remix(
                actor,
                place,
                _view_prompt(view),
                index=int(chosen) - 1,
                job_id=job_id,
                message_id=message_id(channel, meta["ts"]) if meta.get("ts") else None,
                idempotency_key=f"view:{view['id']}",
                delivery={"channel": channel, "user": user, "thread_ts": meta.get("thread_ts")},
            )
        except Exception as e:
            await tell(messages.error_text(e))
            return
        await self.announce(job, actor, tell)

    # -- /imagine-admin ------------------------------------------------------------------------------

    async def admin_command(self, command: Mapping[str, Any], respond: Any) -> None:
        tell = self.via_respond(respond)
        name = self.cfg.admin_command
        try:
            cmd = admin.parse(command.get("text") or "")
        except admin.AdminUsage as e:
            await tell(f":warning: {e.message}\n{messages.admin_help(name)}")
            return
        if cmd.action == "help":
            await tell(messages.admin_help(name))
            return
        team = command.get("team_id")
        place = Place(PLATFORM, team, command.get("channel_id"))
        try:
            actor = await self.actor(command["user_id"], command.get("user_name", ""))
            await tell(await self._run_admin(cmd, actor, place, team))
        except Exception as e:
            await tell(messages.error_text(e))

    async def _run_admin(self, cmd: admin.AdminCommand, actor: Actor, place: Place, team: str | None) -> str:
        s, uid = self.service, cmd.user_id or ""
        who = f"<@{uid}>"
        if cmd.action == "stats":
            return messages.stats_text(await s.stats(actor, place))
        if cmd.action == "usage":
            return messages.quota_text(await s.usage(actor, place, uid), who)
        if cmd.action == "limit_user":
            q = await s.set_user_limit(actor, uid, cmd.number)
            return f"Daily limit for {who} {_limit_words(cmd.number)}. " + messages.quota_text(q, who)
        if cmd.action == "limit_workspace":
            if team is None:
                return ":warning: This command did not come from a workspace."
            await s.set_guild_limit(actor, team, cmd.number)
            return f"Default daily limit for this workspace {_limit_words(cmd.number)}."
        if cmd.action == "credits":
            q = await s.grant_credits(actor, uid, cmd.number or 0)
            return f"Granted {cmd.number} bonus image(s) to {who}. " + messages.quota_text(q, who)
        if cmd.action == "reset":
            return f"Usage of {who} reset. " + messages.quota_text(await s.reset_usage(actor, uid), who)
        if cmd.action == "ban":
            await s.ban(actor, uid, cmd.reason)
            return f"{who} is banned" + (f" ({messages.escape(cmd.reason)})." if cmd.reason else ".")
        if cmd.action == "unban":
            await s.unban(actor, uid)
            return f"{who} is no longer banned."
        if cmd.action == "default_model":
            model = cmd.names[0] if cmd.names else None
            listing = await s.set_default_model(actor, place, model)
            what = f"*{messages.escape(model)}*" if model else "the servers' default"
            return f"Default model for this workspace: {what}.\n" + messages.models_text(listing)
        if cmd.action == "allow_models":
            listing = await s.allow_models(actor, place, list(cmd.names))
            return "Allowed models updated.\n" + messages.models_text(listing)
        if cmd.action == "allow_loras":
            listing = await s.allow_loras(actor, place, list(cmd.names))
            return "Allowed LoRAs updated.\n" + messages.models_text(listing)
        if cmd.action == "settings":
            return messages.settings_text(await s.place_settings(actor, place))
        if cmd.action == "channels":
            settings = await s.allow_channels(actor, place, list(cmd.channels))
            return "Allowed channels updated.\n" + messages.settings_text(settings)
        here = cmd.channels[0] if cmd.channels else place.channel_id or ""
        if cmd.action == "channel_defaults":
            d = dict(cmd.defaults)
            steps = d.get("steps")
            if steps is not None and (not steps.isascii() or not steps.isdigit() or len(steps) > 4):
                return f":warning: steps must be a whole number, got `{messages.escape(steps[:20])}`."
            defaults = ChannelDefaults(d.get("model"), d.get("ar"), int(steps) if steps else None)
            settings = await s.set_channel_defaults(actor, place, here, defaults)
            return f"Defaults of <#{here}> updated.\n" + messages.settings_text(settings)
        if cmd.action == "private":
            settings = await s.set_private(actor, place, None if cmd.workspace else here, cmd.private)
            where = "this workspace" if cmd.workspace else f"<#{here}>"
            mode = {True: "on", False: "off", None: "as the workspace"}[cmd.private]
            return f"Private mode of {where}: {mode}.\n" + messages.settings_text(settings)
        raise AssertionError(f"unhandled admin action {cmd.action}")


class _ClientGivenFilter(logging.Filter):
    """AsyncApp reads SLACK_BOT_TOKEN from the environment by itself and then warns that the token
    is unused because a client was given; that client carries the same token, so the warning is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != warning_client_prioritized_and_token_skipped()


def _limit_words(number: int | None) -> str:
    return "removed (the default applies)" if number is None else f"set to {number}"


def _view_prompt(view: Mapping[str, Any]) -> str:
    values = ((view.get("state") or {}).get("values") or {}).get(PROMPT_BLOCK) or {}
    return ((values.get(PROMPT_BLOCK) or {}).get("value") or "").strip()


def inpaint_modal(meta: Mapping[str, Any]) -> dict[str, Any]:
    image = meta["image"]["name"]
    mask = meta.get("mask")
    source = f"Image: `{image}`" + (
        f", mask: `{mask['name']}`" if mask else " (its transparent areas get repainted)"
    )
    return {
        "type": "modal",
        "callback_id": INPAINT_VIEW_CALLBACK,
        "title": {"type": "plain_text", "text": "Inpaint"},
        "submit": {"type": "plain_text", "text": "Inpaint"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "private_metadata": json.dumps(meta),
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": source}},
            {
                "type": "input",
                "block_id": PROMPT_BLOCK,
                "label": {"type": "plain_text", "text": "What should be painted there?"},
                "element": {
                    "type": "plain_text_input",
                    "action_id": PROMPT_BLOCK,
                    "max_length": MAX_PROMPT_CHARS,
                    "placeholder": {"type": "plain_text", "text": "a red knitted hat --seed 7"},
                },
            },
        ],
    }


def remix_modal(job: JobView, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The dialog of Remix: the prompt and flags to start from, and which image for several."""
    blocks: list[dict[str, Any]] = [
        {
            "type": "input",
            "block_id": PROMPT_BLOCK,
            "label": {"type": "plain_text", "text": "Prompt and flags"},
            "element": {
                "type": "plain_text_input",
                "action_id": PROMPT_BLOCK,
                "multiline": True,
                "max_length": MAX_PROMPT_CHARS + 200,
                "initial_value": remix_text(job)[: MAX_PROMPT_CHARS + 200],
            },
            "hint": {
                "type": "plain_text",
                "text": "--strength 0-1 sets how far it may stray from the image.",
            },
        }
    ]
    n = len(job.images)
    if n > 1:
        options = [
            {"text": {"type": "plain_text", "text": f"Image {i + 1}"}, "value": str(i + 1)} for i in range(n)
        ]
        blocks.append(
            {
                "type": "input",
                "block_id": IMAGE_BLOCK,
                "label": {"type": "plain_text", "text": "Start from"},
                "element": {
                    "type": "static_select",
                    "action_id": IMAGE_BLOCK,
                    "options": options,
                    "initial_option": options[0],
                },  # fmt: skip
            }
        )
    return {
        "type": "modal",
        "callback_id": REMIX_VIEW_CALLBACK,
        "title": {"type": "plain_text", "text": "Remix"},
        "submit": {"type": "plain_text", "text": "Remix"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "private_metadata": json.dumps(meta),
        "blocks": blocks,
    }


class SlackDelivery:
    """The core's `Delivery` for Slack. Everything it needs comes from `job.delivery` (channel, user,
    thread) and the core, so jobs left over by a previous run are delivered after a restart.

    One message per job: the status message (with its Cancel button) while the job waits or runs;
    the result is a file share whose blocks carry the buttons, and the status message is removed
    once it is shared (a failure or a cancellation is shown in the status message instead).

    A result is posted once, even if the bot stops (or dies) while delivering it. The upload is
    done in Slack's three steps by hand so that the intent is recorded in between: the file ids are
    kept with the job (`result_files`) after the bytes are uploaded and before
    `files.completeUploadExternal` shares them, and the job counts as delivered
    (`ImageService.record_shown`) as soon as that returns, before the message showing it is looked
    for. A later delivery attempt (`job.delivery_attempt` >= 2, a crash between the two) asks
    `files.info` where those files were shared; if they were, that message is the result. Slack
    shares asynchronously: the message id is looked for briefly, then in the background; after a
    restart, a reaction on the message finds it by its files.
    """

    def __init__(self, adapter: SlackAdapter) -> None:
        self._adapter = adapter
        self._late: set[asyncio.Task[None]] = set()

    async def on_queued(self, job: JobView, position: int) -> None:
        if job.private:  # no status message in the channel (Slack can't edit an ephemeral one)
            return
        await self._adapter.status.show(job, QUEUED, messages.queued_text(job, position), throttle=True)

    async def on_waiting(self, job: JobView, message: str) -> None:
        await self._adapter.status.show(job, RUNNING, messages.waiting_text(job, message), throttle=True)

    async def on_progress(self, job: JobView, step: int, total: int) -> None:
        if job.private:
            return
        text = messages.progress_text(job, step, total)
        await self._adapter.status.show(job, RUNNING, text, throttle=True)

    async def on_succeeded(self, job: JobView, images: Sequence[ResultImage]) -> None:
        a = self._adapter
        channel = job_channel(job)
        if channel is None:
            log.error("slack: job %s has no channel to deliver to", job.id)
            return
        if job.private:
            # Slack can't attach files to an ephemeral message: a private result goes to the
            # requester's DM with the bot (the same double-post checks apply there).
            opened = await a.client.conversations_open(users=job.delivery.get("user") or job.user_id)
            channel = opened["channel"]["id"]
        earlier = [f for f in (job.delivery.get("result_files") or "").split(",") if f]
        if job.delivery_attempt > 1 and earlier:
            ts = await self._share_ts(earlier, channel, [])
            if ts is not None:
                log.info("slack: job %s: result already posted (%s); recording it", job.id, ts)
                await a.status.retire(job)
                await self._shown(job, channel, ts)
                return
            log.info("slack: job %s: files %s of an earlier attempt were never shared", job.id, earlier)
        try:
            uploaded = await self._upload(job, images)
            # The intent, before the share: a later attempt asks Slack where these files went.
            await self._remember(job, {"result_files": ",".join(file_id for file_id, _ in uploaded)})
            resp = await self._share(job, channel, uploaded)
        except SlackApiError as e:
            await self._cannot_post(job, channel, e)
            raise
        # Shared: delivered from here on, whatever happens next (a stop while the message id is
        # looked for must not post it again after the restart).
        await a.service.record_shown(job.id)
        await a.status.retire(job)
        file_ids = [f["id"] for f in resp.get("files") or []]
        ts = await self._share_ts(file_ids, channel, resp.get("files") or [])
        if ts is None:
            log.info(
                "slack: job %s: the share of %s is not shown yet; looking on in the background",
                job.id,
                file_ids,
            )
            task = asyncio.create_task(
                self._find_late_share(job, channel, file_ids), name=f"slack share {job.id}"
            )
            self._late.add(task)
            task.add_done_callback(self._late.discard)
            return
        await self._shown(job, channel, ts)
        if job.private:
            await self._tell_user(job, messages.PRIVATE_DELIVERED)

    async def _share(self, job: JobView, channel: str, uploaded: list[tuple[str, str]]) -> AsyncSlackResponse:
        """`files.completeUploadExternal` with the result's text and buttons as blocks; with the
        text alone if Slack refuses those blocks (reactions still work then)."""
        client = self._adapter.client
        files: list[dict[str, str | None]] = [{"id": file_id, "title": title} for file_id, title in uploaded]
        thread_ts = None if job.private else job.delivery.get("thread_ts")  # private: in the DM
        try:
            return await client.files_completeUploadExternal(
                files=files, channel_id=channel, thread_ts=thread_ts,
                blocks=json.dumps(messages.result_blocks(job)),
            )  # fmt: skip
        except SlackApiError as e:
            if e.response.get("error") not in ("invalid_blocks", "invalid_blocks_format"):
                raise
            log.warning(
                "slack: job %s: Slack refused the result's buttons (%s); sharing it without",
                job.id,
                e.response.get("error"),
            )
        return await client.files_completeUploadExternal(
            files=files, channel_id=channel, thread_ts=thread_ts, initial_comment=messages.result_comment(job)
        )

    async def _find_late_share(self, job: JobView, channel: str, file_ids: list[str]) -> None:
        for delay in LATE_SHARE_DELAYS_S:
            await asyncio.sleep(delay)
            ts = await self._share_ts(file_ids, channel, [], delays=(0.0,))
            if ts is not None:
                log.info("slack: job %s: its share showed up late (%s)", job.id, ts)
                try:
                    await self._shown(job, channel, ts)
                except Exception:
                    log.warning("slack: job %s: could not record its late share", job.id, exc_info=True)
                return
        log.warning(
            "slack: job %s: no message shows files %s; a reaction on it is resolved by them", job.id, file_ids
        )

    async def close(self) -> None:
        """Stop looking for late shares (at shutdown; a reaction resolves them by their files)."""
        tasks = list(self._late)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _shown(self, job: JobView, channel: str, ts: str) -> None:
        """The result is in message `ts`: record it (reactions resolve through it), add the hints."""
        a = self._adapter
        await a.service.attach_result_message(job.id, message_id(channel, ts), channel_id=channel)
        if a.cfg.add_reaction_hints:
            await self._add_hints(job, channel, ts)

    async def _upload(self, job: JobView, images: Sequence[ResultImage]) -> list[tuple[str, str]]:
        """Steps 1 and 2 of Slack's upload (an upload URL per file, then its bytes), nothing shared
        yet; returns (file id, title) of each, for `files.completeUploadExternal`."""
        a = self._adapter
        files = []
        for img in images:
            name = f"imagine-{job.id}-{img.index + 1}-seed{img.seed}.png"
            url = await a.client.files_getUploadURLExternal(
                filename=name, length=len(img.png), alt_txt=job.prompt[:1000]
            )
            async with a.http.post(url["upload_url"], data=img.png) as resp:
                if resp.status != 200:
                    raise SlackApiError(
                        f"upload of {name} answered HTTP {resp.status}",
                        {"ok": False, "error": f"upload_http_{resp.status}"},
                    )
            files.append((url["file_id"], f"{job.prompt[:80]} (seed {img.seed})"))
        return files

    async def _remember(self, job: JobView, values: Mapping[str, str]) -> None:
        try:
            await self._adapter.service.remember_delivery(job.id, values)
        except Exception:  # posting anyway: a crash right now would then post the result twice
            log.warning("slack: job %s: could not record %s", job.id, sorted(values), exc_info=True)

    async def on_failed(self, job: JobView, message: str) -> None:
        a = self._adapter
        text = messages.failed_text(job, message)
        if a.status.has_message(job):
            await a.status.show(job, DONE, text)  # the status message becomes the failure
            return
        await self._tell_user(job, text)

    async def _tell_user(self, job: JobView, text: str) -> None:
        """An ephemeral note to the job's requester; where the bot may not post, the command's
        response_url (valid 30 minutes) still reaches them."""
        a = self._adapter
        channel, user = job_channel(job), job.delivery.get("user") or job.user_id
        try:
            if channel is None:
                raise SlackApiError("no channel", {"ok": False, "error": "channel_not_found"})
            await a.client.chat_postEphemeral(
                channel=channel, user=user, text=text, thread_ts=job.delivery.get("thread_ts")
            )
            return
        except SlackApiError as e:
            log.warning("slack: job %s: could not tell %s: %s", job.id, user, e.response.get("error"))
        response_url = job.delivery.get("response_url")
        if not response_url:
            return
        body = {"text": text, "response_type": "ephemeral", "replace_original": False}
        try:
            async with a.http.post(response_url, json=body) as resp:
                if resp.status >= 400:
                    log.warning("slack: job %s: response_url answered %s", job.id, resp.status)
        except aiohttp.ClientError as e:
            log.warning("slack: job %s: response_url failed: %r", job.id, e)

    async def _share_ts(
        self,
        file_ids: list[str],
        channel: str,
        files: list[Mapping[str, Any]],
        delays: Sequence[float] | None = None,
    ) -> str | None:
        """The ts of the message that shows the uploaded files (Slack shares them asynchronously)."""
        if not file_ids:
            return None
        first: Mapping[str, Any] = files[0] if files else {}
        for delay in SHARE_POLL_DELAYS_S if delays is None else delays:
            ts = _ts_in_shares(first.get("shares") or {}, channel)
            if ts:
                return ts
            await asyncio.sleep(delay)
            try:
                first = (await self._adapter.client.files_info(file=file_ids[0]))["file"]
            except SlackApiError as e:
                log.warning("slack: files.info %s failed: %s", file_ids[0], e.response.get("error"))
                return None
        return _ts_in_shares(first.get("shares") or {}, channel)

    async def _add_hints(self, job: JobView, channel: str, ts: str) -> None:
        names = ["repeat"] + (
            ["one", "two", "three", "four"][: job.params.n] if job.params.n > 1 else ["art"]
        )
        for name in names:
            try:
                await self._adapter.client.reactions_add(channel=channel, timestamp=ts, name=name)
            except SlackApiError as e:
                log.info("slack: reaction hint %s on %s failed: %s", name, ts, e.response.get("error"))
                return

    async def _cannot_post(self, job: JobView, channel: str, e: SlackApiError) -> None:
        error = e.response.get("error")
        log.error("slack: job %s: upload to %s failed: %s", job.id, channel, error)
        if error in CANNOT_POST:
            await self._tell_user(job, messages.cannot_post_text(cancelled=False))


def _ts_in_shares(shares: Mapping[str, Any], channel: str) -> str | None:
    for scope in ("public", "private"):
        entries = (shares.get(scope) or {}).get(channel) or []
        if entries:
            return entries[0].get("ts")
    return None
