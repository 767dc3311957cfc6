"""The Gradio Blocks of the playground: chat, inpaint, history and admin tabs.

Handlers are async and run on the event loop that serves Gradio, which is the loop of the core
(`server.py` mounts this app on a uvicorn server started inside the bot's loop), so they call the
`ImageService` directly. They only translate: a browser event becomes a core request, and core
results and errors become chat messages (all texts in `texts.py`).
"""

from __future__ import annotations

import asyncio
import hmac
import io
import logging
import re
import unicodedata
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import gradio as gr
from PIL import Image

from bot.core.api import Actor, BadParameters, CoreError, JobView, ModelListing, Place
from bot.core.controls import Pressed, press
from bot.core.uploads import MAX_INPUT_PIXELS
from bot.playground import texts
from bot.playground.config import MAX_PASSWORD_CHARS, PLATFORM, USERNAME_RE, PlaygroundConfig
from bot.playground.delivery import JobEvent, WebDelivery

log = logging.getLogger("bot.playground")

PLACE = Place(PLATFORM)
MAX_IMAGES = 4  # one U and one V button per image of a job; a job has at most 4 images (--n 4)


@dataclass(frozen=True)
class Button:
    """A control under the chat: the core control's operation and argument (`bot.core.controls`;
    remix takes the prompt box), its label, element id and API name."""

    op: str
    arg: str
    label: str
    elem_id: str
    api_name: str

    def enabled_for(self, n: int) -> bool:
        """Usable on a result of `n` images: per-image buttons for the images it has, the
        single-image operations (vary, zoom, pan) on one image, re-roll and remix on any."""
        if self.op in ("up", "var"):
            return int(self.arg) < n
        if self.op in ("vary", "zoom", "pan"):
            return n == 1
        return n > 0


BUTTON_ROWS: tuple[tuple[Button, ...], ...] = (
    (
        Button("reroll", "", "🔁 Re-roll", "reroll", "reroll"),
        *(Button("var", str(i), f"V{i + 1}", f"v{i + 1}", f"variation_{i + 1}") for i in range(MAX_IMAGES)),
    ),
    (
        *(Button("up", str(i), f"U{i + 1}", f"u{i + 1}", f"upscale_{i + 1}") for i in range(MAX_IMAGES)),
        Button("remix", "", "✏️ Remix", "remix", "remix"),
    ),
    (
        Button("vary", "strong", "Vary (Strong)", "vary-strong", "vary_strong"),
        Button("vary", "subtle", "Vary (Subtle)", "vary-subtle", "vary_subtle"),
        Button("zoom", "2", "Zoom Out 2x", "zoom-2", "zoom_out_2x"),
        Button("zoom", "1.5", "Zoom Out 1.5x", "zoom-1-5", "zoom_out_1_5x"),
        *(
            Button("pan", d, arrow, f"pan-{d}", f"pan_{d}")
            for d, arrow in (("left", "⬅️"), ("right", "➡️"), ("up", "⬆️"), ("down", "⬇️"))
        ),
    ),
)
BUTTONS = tuple(b for row in BUTTON_ROWS for b in row)


@dataclass(frozen=True)
class Identity:
    """Who the browser is. Without a password: the one local user, an admin (only this machine can
    reach a loopback playground). With PLAYGROUND_PASSWORD: the login name; admins are the
    `[playground] admin_users`, who sign in with PLAYGROUND_ADMIN_PASSWORD."""

    config: PlaygroundConfig
    password: str = ""
    admin_password: str = ""

    @classmethod
    def from_env(cls, config: PlaygroundConfig, env: Mapping[str, str]) -> Identity:
        return cls(config, env.get("PLAYGROUND_PASSWORD", ""), env.get("PLAYGROUND_ADMIN_PASSWORD", ""))

    @property
    def auth_required(self) -> bool:
        return bool(self.password)

    def check_login(self, username: str, password: str) -> bool:
        """Gradio's login check; never raises, whatever the form sent."""
        if not isinstance(username, str) or USERNAME_RE.fullmatch(username) is None:
            return False
        expected = self.admin_password if username in self.config.admin_users else self.password
        if not expected or not isinstance(password, str) or not password.strip():
            return False
        if len(password) > MAX_PASSWORD_CHARS:
            return False
        return hmac.compare_digest(_password_bytes(password), _password_bytes(expected))

    def actor(self, request: gr.Request | None) -> Actor:
        if not self.auth_required:
            name = self.config.local_user
            return Actor(PLATFORM, name, name, is_admin=True)
        username = getattr(request, "username", None) if request is not None else None
        if not username:
            raise PermissionError("not signed in")
        return Actor(PLATFORM, username, username, is_admin=username in self.config.admin_users)


def _password_bytes(password: str) -> bytes:
    """What is compared: the NFC form (one keyboard sends "é" as one code point, another as "e" plus
    an accent) as UTF-8 bytes, which `hmac.compare_digest` takes whatever the characters. A lone
    surrogate cannot be typed; "surrogatepass" keeps it from raising, and it matches nothing."""
    return unicodedata.normalize("NFC", password).encode("utf-8", "surrogatepass")


def parse_command(text: str) -> tuple[str, str]:
    """("imagine" | "help" | "quota" | "history" | other, rest). A bare prompt means /imagine."""
    t = text.strip()
    if not t.startswith("/"):
        return "imagine", t
    head, _, rest = t.partition(" ")
    return head[1:].lower(), rest.strip()


_MODEL_FLAG = re.compile(r"(?:^|\s)(?:--|\u2014|\u2013)model(?:\s+\S+)?", re.IGNORECASE)
_NO_FLAG = re.compile(r"(?:^|\s)(?:--|\u2014|\u2013)no(?=\s|$)", re.IGNORECASE)


def with_model_flag(text: str, model: str | None) -> str:
    """`text` with its `--model` replaced by `model` (removed for None). Put before a `--no`, which
    takes the rest of the text."""
    text = _MODEL_FLAG.sub("", text or "").strip()
    if not model:
        return text
    flag = f"--model {model}"
    no = _NO_FLAG.search(text)
    if no is None:
        return f"{text} {flag}".strip()
    return f"{text[: no.start()].rstrip()} {flag} {text[no.start() :].lstrip()}".strip()


def model_choices(listing: ModelListing) -> list[tuple[str, str]]:
    """The Model list's entries: (label, name), the default first."""
    return [(f"{m.name} ({m.label}{', default' if m.default else ''})", m.name) for m in listing.models]


def mask_from_editor(value: Mapping[str, Any] | None) -> tuple[bytes, bytes | None]:
    """(image PNG, mask PNG or None) from an ImageEditor value: the background is the image, and
    every pixel painted on any layer is white (repaint) in the mask."""
    if not value or value.get("background") is None:
        raise CoreErrorForUser("Upload an image first (drop it on the editor).")
    background: Image.Image = value["background"]
    if not isinstance(background, Image.Image):
        raise CoreErrorForUser("Upload an image first (drop it on the editor).")
    if background.width * background.height > MAX_INPUT_PIXELS:
        # Refused before the conversions below copy it: the core takes at most this many pixels.
        raise BadParameters(
            "image", f"The image is {background.width}x{background.height}; at most 4096x4096."
        )
    image = background.convert("RGBA")
    # One band's extrema are one (lowest, highest) pair.
    lowest_alpha, _ = cast(tuple[int, int], image.getchannel("A").getextrema())
    if lowest_alpha < 255:
        # Transparent parts of an upload would look black to the model: put them on white.
        flat = Image.new("RGBA", image.size, (255, 255, 255, 255))
        flat.alpha_composite(image)
        image = flat
    mask = Image.new("L", image.size, 0)
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        alpha = layer.convert("RGBA").getchannel("A")
        if alpha.size != image.size:
            alpha = alpha.resize(image.size, Image.Resampling.NEAREST)
        mask.paste(255, mask=alpha.point(lambda a: 255 if a > 0 else 0))
    out = io.BytesIO()
    image.convert("RGB").save(out, format="PNG")
    if mask.getextrema()[1] == 0:
        return out.getvalue(), None
    mask_out = io.BytesIO()
    mask.save(mask_out, format="PNG")
    return out.getvalue(), mask_out.getvalue()


class CoreErrorForUser(CoreError):
    """A refusal decided by the playground itself (before the core is asked)."""

    code = "playground"


def whole_number(value: Any, field: str) -> int | None:
    """A number box's value as a whole number; None when empty. Refuses 1.5, infinities and NaN
    (which int() would cut, or fail on with an OverflowError) with a message naming the box."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadParameters(field, f"The {field} must be a whole number, got {value!r}.", value)
    try:
        number = float(value)
    except ValueError:
        raise BadParameters(field, f"The {field} must be a whole number, got {value!r}.", value) from None
    if not number.is_integer() or abs(number) > 1e9:
        raise BadParameters(field, f"The {field} must be a whole number, got {value!r}.", value)
    return int(number)


def result_gallery(job: JobView, paths: list[str]) -> gr.Gallery:
    return gr.Gallery(
        value=[(p, f"V{i + 1}") for i, p in enumerate(paths)],
        columns=min(len(paths), 4),
        height=200,
        object_fit="contain",
        show_label=False,
        allow_preview=True,
    )


def _key() -> str:
    return uuid.uuid4().hex


class PlaygroundUI:
    def __init__(
        self,
        service: Any,
        config: PlaygroundConfig,
        identity: Identity,
        delivery: WebDelivery,
        media_dir: Path,
    ):
        self.service = service
        self.config = config
        self.identity = identity
        self.delivery = delivery
        self.media_dir = media_dir

    # -- helpers ---------------------------------------------------------------------------------

    async def image_path(self, storage_key: str, png: bytes | None = None) -> str:
        """A file Gradio can serve for a stored image (content-addressed, so written once)."""
        path = self.media_dir / f"{storage_key}.png"
        if not path.exists():
            data = png if png is not None else await self.service.image_bytes(storage_key)
            tmp = path.with_suffix(".tmp")
            try:
                await asyncio.to_thread(tmp.write_bytes, data)
                tmp.replace(path)
            except OSError as e:
                log.error("playground: cannot write %s: %s", path, e)
                raise CoreErrorForUser(
                    "The image is made but the playground could not prepare it for display (its "
                    "temporary folder is not writable); it is in your history."
                ) from e
        return str(path)

    async def job_images(self, job: JobView, event: JobEvent | None = None) -> list[str]:
        if event is not None and event.images:
            return [await self.image_path(r.info.storage_key, r.png) for r in event.images]
        return [await self.image_path(info.storage_key) for info in job.images]

    async def quota_text(self, actor: Actor) -> str:
        try:
            return texts.quota(await self.service.quota(actor, PLACE))
        except Exception as e:  # noqa: BLE001 - shown to the user, logged by error_text
            return texts.error_text(e)

    async def follow(self, job: JobView) -> AsyncIterator[JobEvent]:
        """The job's events until it is done: pushed by the delivery, or asked of the core when
        nothing came for `poll_interval_s` (a missed event, or another process reporting or
        delivering).

        The first status is asked of the core once the stream listens: the core reports a queued
        job's position once and then only when it changes, and its first report can come while the
        submission is still returning, before there is a stream to hear it."""
        queue = self.delivery.subscribe(job.id)
        try:
            if job.done:
                yield self._final_from_row(job)
                return
            shown = JobEvent("queued", job, position=await self._position(job))
            yield shown
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=self.config.poll_interval_s)
                except TimeoutError:
                    polled = await self._status_from_core(job, shown)
                    if polled is None:
                        continue
                    event = polled
                shown = event
                yield event
                if event.final:
                    return
        finally:
            self.delivery.unsubscribe(job.id, queue)

    async def _position(self, job: JobView) -> int | None:
        """The job's place in the queue now; None when it is not queued, far back, or unknown (the
        status then shows without it)."""
        try:
            return await self.service.queue_position(job.id)
        except CoreError as e:
            log.warning("playground: job %s: queue position unavailable: %s", job.id, e.message)
            return None

    async def _status_from_core(self, job: JobView, shown: JobEvent) -> JobEvent | None:
        """What the stream should show now that nothing came for a while, read from the job's row
        (and its queue position), or None when `shown` is still true. Catches a result, a position
        or a start that was reported where this stream could not hear it (before it listened, or
        by another bot process sharing the database)."""
        fresh = await self.service.get_job(job.id)
        if fresh.done:
            return self._final_from_row(fresh)
        if fresh.state == "queued":
            position = await self._position(job)
            if shown.kind == "queued" and not shown.message and shown.position == position:
                return None
            return JobEvent("queued", job, position=position)
        if fresh.state == "running" and shown.kind == "queued" and not shown.message:
            return JobEvent("progress", job, step=0, total=fresh.params.steps)
        return None

    @staticmethod
    def _final_from_row(job: JobView) -> JobEvent:
        if job.state == "succeeded":
            return JobEvent("succeeded", job)
        return JobEvent("failed", job, message=job.error or f"the job was {job.state}")

    # -- chat ------------------------------------------------------------------------------------

    def _buttons(self, job: JobView | None) -> list[Any]:
        ok = job is not None and job.state == "succeeded"
        n = (len(job.images) or job.params.n) if ok and job is not None else 0
        return [gr.update(interactive=b.enabled_for(n)) for b in BUTTONS]

    async def _run_job(
        self,
        actor: Actor,
        chat: list[dict[str, Any]],
        user_text: str,
        submit: Callable[[], Awaitable[JobView]],
        last_job: int | None,
    ) -> AsyncIterator[tuple[Any, ...]]:
        """Submit, then stream the chat, status panel and buttons until the job is done.
        Yields (chat, status, last_job, *the buttons, quota)."""
        chat = [*chat, {"role": "user", "content": user_text}]
        idle = self._buttons(None)
        try:
            job = await submit()
        except Exception as e:  # noqa: BLE001 - CoreError for the user; others logged in error_text
            chat.append({"role": "assistant", "content": texts.error_text(e)})
            yield (list(chat), texts.status_html("error", texts.error_text(e)), last_job, *self._keep(),
                   await self.quota_text(actor))  # fmt: skip
            return
        quota = await self.quota_text(actor)
        reply_at = len(chat)
        chat.append({"role": "assistant", "content": texts.queued(job, job.position)})
        preview = b""
        try:
            async for event in self.follow(job):
                if event.kind == "queued":
                    text = event.message or texts.queued(job, event.position)
                    chat[reply_at] = {"role": "assistant", "content": text}
                    yield list(chat), texts.status_html("queued", text, job.id), last_job, *idle, quota
                elif event.kind in ("progress", "preview"):
                    preview = event.png or preview  # a progress line keeps the last preview shown
                    text = texts.progress(job, event.step, event.total)
                    chat[reply_at] = {"role": "assistant", "content": text}
                    status = texts.status_html("running", text, job.id, event.step, event.total, preview)
                    yield list(chat), status, last_job, *idle, quota
                elif event.kind == "succeeded":
                    done = await self.service.get_job(job.id)
                    paths = await self.job_images(done, event)
                    chat[reply_at] = {"role": "assistant", "content": texts.caption(done)}
                    # One gallery per result, like one chat message with its images: numbered in the
                    # order the V1-V4 buttons use, and shown larger than a 64-pixel image would be.
                    chat.append({"role": "assistant", "content": result_gallery(done, paths)})
                    status = texts.status_html("succeeded", f"Job #{done.id} done.", done.id)
                    yield list(chat), status, done.id, *self._buttons(done), await self.quota_text(actor)
                else:
                    text = texts.failed(job, event.message)
                    chat[reply_at] = {"role": "assistant", "content": text}
                    yield (list(chat), texts.status_html("failed", text, job.id), last_job, *self._keep(),
                           await self.quota_text(actor))  # fmt: skip
        except Exception as e:  # noqa: BLE001 - the job is safe in its row; say what failed
            text = texts.error_text(e)
            chat[reply_at] = {"role": "assistant", "content": text}
            yield list(chat), texts.status_html("error", text, job.id), last_job, *self._keep(), gr.update()

    def _nothing_yet(self, chat: list[dict[str, Any]]) -> tuple[Any, ...]:
        status = texts.status_html(
            "error", "Nothing to re-roll, vary or change yet: generate an image first."
        )
        return (chat, chat, status, None, *self._keep(), gr.update())

    @staticmethod
    def _keep() -> list[Any]:
        """Leave the buttons as they were (still about the last result)."""
        return [gr.update() for _ in BUTTONS]

    async def on_message(
        self, text: str, chat: list[dict[str, Any]], last_job: int | None, request: gr.Request
    ) -> AsyncIterator[tuple[Any, ...]]:
        actor = self.identity.actor(request)
        text = (text or "").strip()
        if not text:
            yield ("", chat, chat, gr.update(), last_job, *self._keep(), gr.update())
            return
        command, rest = parse_command(text)
        if command != "imagine":
            if command == "quota":
                reply = await self.quota_text(actor)
            elif command == "history":
                try:
                    reply = texts.history(await self.service.history(actor, limit=10))
                except Exception as e:  # noqa: BLE001
                    reply = texts.error_text(e)
            elif command == "help":
                reply = texts.help_text(await self._listing())
            elif command == "models":
                listing = await self._listing()
                reply = texts.models(listing) if listing is not None else texts.NO_MODELS_NOW
            else:
                reply = f"Unknown command `/{command}`.\n\n{texts.HELP}"
            chat = [*chat, {"role": "user", "content": text}, {"role": "assistant", "content": reply}]
            yield ("", chat, chat, gr.update(), last_job, *self._keep(), await self.quota_text(actor))
            return

        async def submit() -> JobView:
            return await self.service.imagine(
                actor, PLACE, rest, None, idempotency_key=_key(), delivery={"via": "playground"}
            )

        async for update in self._run_job(actor, chat, text, submit, last_job):
            yield ("", update[0], *update)

    def control_handler(self, button: Button) -> Callable[..., AsyncIterator[tuple[Any, ...]]]:
        """The click of a button under a result: the job it asks for, from the last result."""

        async def on_control(
            chat: list[dict[str, Any]], last_job: int | None, request: gr.Request
        ) -> AsyncIterator[tuple[Any, ...]]:
            actor = self.identity.actor(request)
            if last_job is None:
                yield self._nothing_yet(chat)
                return

            async def submit() -> JobView:
                return await press(
                    self.service, actor, PLACE, Pressed(button.op, last_job, button.arg),
                    message_id=None, idempotency_key=_key(), delivery={"via": "playground"},
                )  # fmt: skip

            async for update in self._run_job(
                actor, chat, texts.pressed(button.label, last_job), submit, last_job
            ):
                yield (update[0], *update)

        on_control.__name__ = button.api_name
        return on_control

    async def on_remix(
        self, text: str, chat: list[dict[str, Any]], last_job: int | None, request: gr.Request
    ) -> AsyncIterator[tuple[Any, ...]]:
        """Remix the last result's first image with the prompt and flags typed in the prompt box."""
        actor = self.identity.actor(request)
        if last_job is None:
            yield ("", *self._nothing_yet(chat))
            return
        text = (text or "").strip()
        if not text:
            status = texts.status_html("error", texts.REMIX_HOW)
            yield (gr.update(), chat, chat, status, last_job, *self._keep(), gr.update())
            return

        async def submit() -> JobView:
            return await self.service.remix(
                actor, PLACE, text, job_id=last_job, idempotency_key=_key(), delivery={"via": "playground"}
            )

        async for update in self._run_job(
            actor, chat, f"✏️ remix of job #{last_job}: {text}", submit, last_job
        ):
            yield ("", update[0], *update)

    async def on_cancel(self, request: gr.Request) -> str:
        """Cancel the user's latest job that still waits or runs."""
        actor = self.identity.actor(request)
        try:
            pending = [j for j in await self.service.history(actor, limit=10) if not j.done]
            if not pending:
                return texts.status_html("idle", "Nothing to cancel: no job of yours waits or runs.")
            job = await self.service.cancel(actor, pending[0].id, PLACE)
        except Exception as e:  # noqa: BLE001 - shown to the user, logged by error_text
            return texts.status_html("error", texts.error_text(e))
        if job.state == "cancelled":
            return texts.status_html("cancelled", f"Job #{job.id} cancelled; nothing was charged.", job.id)
        return texts.status_html("error", f"Job #{job.id} is {job.state} already.", job.id)

    # -- inpaint ---------------------------------------------------------------------------------

    async def on_inpaint(
        self, editor: dict[str, Any] | None, prompt: str, request: gr.Request
    ) -> AsyncIterator[tuple[Any, ...]]:
        """Yields (status, gallery, quota)."""
        actor = self.identity.actor(request)
        try:
            image, mask = mask_from_editor(editor)
            if mask is None:
                raise CoreErrorForUser("Paint over the part to repaint with the brush first.")
            job = await self.service.inpaint(
                actor, PLACE, prompt or "", image, mask, None,
                idempotency_key=_key(), delivery={"via": "playground"},
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001
            yield texts.status_html("error", texts.error_text(e)), gr.update(), await self.quota_text(actor)
            return
        quota = await self.quota_text(actor)
        preview = b""
        try:
            async for event in self.follow(job):
                if event.kind == "queued":
                    yield (
                        texts.status_html(
                            "queued", event.message or texts.queued(job, event.position), job.id
                        ),
                        gr.update(),
                        quota,
                    )
                elif event.kind in ("progress", "preview"):
                    preview = event.png or preview
                    text = texts.progress(job, event.step, event.total)
                    yield (
                        texts.status_html("running", text, job.id, event.step, event.total, preview),
                        gr.update(),
                        quota,
                    )
                elif event.kind == "succeeded":
                    done = await self.service.get_job(job.id)
                    paths = await self.job_images(done, event)
                    status = texts.status_html(
                        "succeeded", f"Job #{done.id} done: {texts.describe(done)}", done.id
                    )
                    yield status, [(p, f"#{done.id}") for p in paths], await self.quota_text(actor)
                else:
                    text = texts.failed(job, event.message)
                    yield texts.status_html("failed", text, job.id), gr.update(), await self.quota_text(actor)
        except Exception as e:  # noqa: BLE001 - the job is safe in its row; say what failed
            yield texts.status_html("error", texts.error_text(e), job.id), gr.update(), gr.update()

    # -- history ---------------------------------------------------------------------------------

    async def on_history(self, request: gr.Request) -> tuple[Any, str]:
        actor = self.identity.actor(request)
        try:
            jobs = await self.service.history(actor, limit=self.config.history_limit)
        except Exception as e:  # noqa: BLE001
            return [], texts.error_text(e)
        items: list[tuple[str, str]] = []
        for job in jobs:
            if job.state != "succeeded":
                continue
            for info in job.images:
                try:
                    path = await self.image_path(info.storage_key)
                except CoreError as e:  # an image gone from storage: the rest of the history still shows
                    log.warning("playground: history image of job %s not shown: %s", job.id, e.message)
                    continue
                items.append((path, f"#{job.id} · {texts.short(job.prompt, 60)} · seed {info.seed}"))
        return items, texts.history(jobs)

    # -- models --------------------------------------------------------------------------------

    async def _listing(self) -> ModelListing | None:
        try:
            return await self.service.models(PLACE)
        except CoreError as e:  # the database is away: the page still works without the list
            log.warning("playground: no model list: %s", e.message)
            return None

    @staticmethod
    def on_model_pick(model: str | None, text: str) -> str:
        """A model picked in the list becomes the prompt's `--model` flag (what the API takes too)."""
        return with_model_flag(text, model)

    # -- admin -----------------------------------------------------------------------------------

    async def on_load(self, request: gr.Request) -> tuple[Any, ...]:
        """Page load: who am I, my quota, whether the admin panel is shown, and the models."""
        actor = self.identity.actor(request)
        who = f"Signed in as **{actor.user_id}**" + (" (admin)" if actor.is_admin else "")
        listing = await self._listing()
        choice = listing is not None and listing.choice
        return (
            who,
            await self.quota_text(actor),
            gr.update(visible=actor.is_admin),
            gr.update(visible=not actor.is_admin),
            gr.update(choices=model_choices(listing) if listing else [], visible=choice, value=None),
            texts.models(listing) if listing is not None else texts.NO_MODELS_NOW,
        )

    def admin_handler(
        self, operation: Callable[[Actor, str, Any, Any], Awaitable[str]]
    ) -> Callable[..., Awaitable[tuple[str, str]]]:
        async def handler(target: str, number: Any, reason: str, request: gr.Request) -> tuple[str, str]:
            actor = self.identity.actor(request)
            target = (target or "").strip() or actor.user_id
            if target.startswith(f"{PLATFORM}:"):
                target = target.split(":", 1)[1]
            try:
                result = await operation(actor, target, number, reason)
            except Exception as e:  # noqa: BLE001
                result = texts.error_text(e)
            return result, await self.quota_text(actor)

        handler.__name__ = operation.__name__
        return handler

    async def admin_usage(self, actor: Actor, target: str, _n: Any, _r: Any) -> str:
        return texts.quota_of(await self.service.usage(actor, PLACE, target))

    async def admin_set_limit(self, actor: Actor, target: str, number: Any, _r: Any) -> str:
        limit = whole_number(number, "limit")
        q = await self.service.set_user_limit(actor, target, limit)
        what = "removed (back to the default)" if limit is None else f"set to {limit} per day"
        return f"Daily limit of `{target}` {what}.\n\n" + texts.quota_of(q)

    async def admin_grant(self, actor: Actor, target: str, number: Any, _r: Any) -> str:
        amount = whole_number(number, "amount")
        if amount is None:
            raise CoreErrorForUser("Enter the number of credits to grant.")
        q = await self.service.grant_credits(actor, target, amount)
        return f"Granted {amount} credits to `{target}`.\n\n" + texts.quota_of(q)

    async def admin_reset(self, actor: Actor, target: str, _n: Any, _r: Any) -> str:
        q = await self.service.reset_usage(actor, target)
        return f"Usage of `{target}` reset.\n\n" + texts.quota_of(q)

    async def admin_ban(self, actor: Actor, target: str, _n: Any, reason: Any) -> str:
        await self.service.ban(actor, target, str(reason or ""))
        return f"`{target}` is banned."

    async def admin_unban(self, actor: Actor, target: str, _n: Any, _r: Any) -> str:
        await self.service.unban(actor, target)
        return f"`{target}` is no longer banned."

    async def admin_stats(self, actor: Actor, _t: str, _n: Any, _r: Any) -> str:
        s = texts.stats(await self.service.stats(actor, PLACE))
        entries = await self.service.audit_log(actor, limit=10)
        if entries:
            s += "\n\nLatest admin actions:\n" + "\n".join(
                f"- {e.created_at:%m-%d %H:%M} `{e.actor_user_id}` {e.action} {e.target}" for e in entries
            )
        return s

    # -- layout ----------------------------------------------------------------------------------

    def build(self) -> gr.Blocks:
        cfg = self.config
        # Gradio serves results from copies in its cache; the originals stay in the image storage,
        # so copies older than a day go (checked hourly) instead of filling the disk.
        with gr.Blocks(title=cfg.title, analytics_enabled=False, delete_cache=(3600, 86400)) as blocks:
            with gr.Row():
                gr.Markdown(f"## {cfg.title}")
                who = gr.Markdown(elem_id="whoami")
            quota = gr.Markdown(elem_id="quota")
            with gr.Tabs():
                with gr.Tab("Imagine", id="imagine"):
                    chatbot = gr.Chatbot(
                        value=[{"role": "assistant", "content": texts.HELP}],
                        height=460,
                        elem_id="chat",
                        show_label=False,
                    )
                    chat_state = gr.State([{"role": "assistant", "content": texts.HELP}])
                    last_job = gr.State(None)
                    with gr.Row():
                        prompt = gr.Textbox(
                            placeholder="/imagine a lighthouse at dusk --n 4 --seed 7",
                            show_label=False,
                            scale=6,
                            elem_id="prompt",
                            autofocus=True,
                        )
                        model = gr.Dropdown(
                            choices=[],
                            value=None,
                            label="Model",
                            elem_id="model",
                            scale=2,
                            visible=False,  # shown at load when the servers offer a choice
                        )
                        send = gr.Button("Generate", variant="primary", scale=1, elem_id="send")
                    with gr.Accordion("Models and LoRAs", open=False):
                        models_md = gr.Markdown(elem_id="models")
                    buttons: list[gr.Button] = []
                    for row in BUTTON_ROWS:
                        with gr.Row():
                            buttons += [
                                gr.Button(b.label, interactive=False, elem_id=b.elem_id, size="sm")
                                for b in row
                            ]
                    with gr.Row():
                        cancel = gr.Button("✖️ Cancel my job", variant="stop", size="sm", elem_id="cancel")
                    status = gr.HTML(texts.status_html("idle", "No job yet."), elem_id="status")
                with gr.Tab("Inpaint", id="inpaint"):
                    gr.Markdown(
                        "Upload an image, paint over the part to repaint with the brush, describe what "
                        "should be there, and press **Inpaint**. Painted = repainted, the rest is kept."
                    )
                    with gr.Row():
                        editor = gr.ImageEditor(
                            type="pil",
                            image_mode="RGBA",
                            sources=("upload", "clipboard"),
                            brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                            layers=gr.LayerOptions(allow_additional_layers=False),
                            transforms=(),
                            label="Image and mask",
                            elem_id="editor",
                            format="png",
                            height=420,
                        )
                        inpaint_gallery = gr.Gallery(label="Result", elem_id="inpaint-result", height=420)
                    with gr.Row():
                        inpaint_prompt = gr.Textbox(
                            placeholder="what to paint there",
                            show_label=False,
                            scale=6,
                            elem_id="inpaint-prompt",
                        )
                        inpaint_btn = gr.Button("Inpaint", variant="primary", scale=1, elem_id="inpaint-send")
                    inpaint_status = gr.HTML(
                        texts.status_html("idle", "No job yet."), elem_id="inpaint-status"
                    )
                with gr.Tab("History", id="history") as history_tab:
                    history_refresh = gr.Button("Refresh", elem_id="history-refresh")
                    gallery = gr.Gallery(columns=6, height=480, elem_id="history-gallery", show_label=False)
                    history_md = gr.Markdown(elem_id="history-list")
                with gr.Tab("Admin", id="admin"):
                    not_admin = gr.Markdown("Only admins can use this tab.", visible=False)
                    with gr.Column(visible=False) as admin_panel:
                        gr.Markdown(
                            "Quotas, bans and stats of playground users (platform `web`); the same "
                            "operations as `/admin` in Discord and `/imagine-admin` in Slack. "
                            "An empty user means yourself."
                        )
                        with gr.Row():
                            target = gr.Textbox(label="User", placeholder="user id", elem_id="admin-user")
                            number = gr.Number(
                                label="Daily limit / credits", precision=0, value=None, elem_id="admin-number"
                            )
                            reason = gr.Textbox(label="Ban reason", elem_id="admin-reason")
                        with gr.Row():
                            b_usage = gr.Button("Show usage", elem_id="admin-usage")
                            b_limit = gr.Button("Set daily limit", elem_id="admin-set-limit")
                            b_grant = gr.Button("Grant credits", elem_id="admin-grant")
                            b_reset = gr.Button("Reset usage", elem_id="admin-reset")
                            b_ban = gr.Button("Ban", variant="stop", elem_id="admin-ban")
                            b_unban = gr.Button("Unban", elem_id="admin-unban")
                            b_stats = gr.Button("Stats", elem_id="admin-stats")
                        admin_out = gr.Markdown(elem_id="admin-result")

            # The chat is kept in a State (the messages as this module wrote them) and shown in the
            # Chatbot: every streamed update goes to both.
            chat_outputs = [chatbot, chat_state, status, last_job, *buttons, quota]
            limit = cfg.concurrency_limit
            message_in, message_out = [prompt, chat_state, last_job], [prompt, *chat_outputs]
            send.click(
                self.on_message, inputs=message_in, outputs=message_out,
                api_name="imagine", concurrency_limit=limit,
            )  # fmt: skip
            # Enter in the prompt box is the same call; the API has it once, as /imagine.
            prompt.submit(
                self.on_message, inputs=message_in, outputs=message_out,
                api_visibility="private", concurrency_limit=limit,
            )  # fmt: skip
            for spec, button in zip(BUTTONS, buttons, strict=True):
                if spec.op == "remix":  # with the text of the prompt box
                    button.click(
                        self.on_remix, inputs=message_in, outputs=message_out,
                        api_name=spec.api_name, concurrency_limit=limit,
                    )  # fmt: skip
                    continue
                button.click(
                    self.control_handler(spec), inputs=[chat_state, last_job], outputs=chat_outputs,
                    api_name=spec.api_name, concurrency_limit=limit,
                )  # fmt: skip
            cancel.click(self.on_cancel, outputs=[status], api_name="cancel")
            inpaint_btn.click(
                self.on_inpaint, inputs=[editor, inpaint_prompt],
                outputs=[inpaint_status, inpaint_gallery, quota], api_name="inpaint", concurrency_limit=limit,
            )  # fmt: skip
            for event in (history_refresh.click, history_tab.select):
                event(self.on_history, outputs=[gallery, history_md], api_visibility="private")
            admin_ops = [
                (b_usage, self.admin_usage),
                (b_limit, self.admin_set_limit),
                (b_grant, self.admin_grant),
                (b_reset, self.admin_reset),
                (b_ban, self.admin_ban),
                (b_unban, self.admin_unban),
                (b_stats, self.admin_stats),
            ]
            for button, op in admin_ops:
                button.click(
                    self.admin_handler(op), inputs=[target, number, reason], outputs=[admin_out, quota],
                    api_name=op.__name__,
                )  # fmt: skip
            model.input(
                self.on_model_pick, inputs=[model, prompt], outputs=[prompt], api_visibility="private"
            )
            blocks.load(
                self.on_load,
                outputs=[who, quota, admin_panel, not_admin, model, models_md],
                api_visibility="private",
            )
        blocks.queue(default_concurrency_limit=limit)
        return blocks
