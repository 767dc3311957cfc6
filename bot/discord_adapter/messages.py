"""The texts users see. Plain functions of core values, so they are the same live and after a restart."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from bot.core.api import (
    ChannelDefaults,
    JobView,
    ModelListing,
    PlaceRules,
    PlaceSettings,
    QuotaView,
    StatsView,
)
from bot.core.describe import (
    MODEL_USAGE,
    NO_MODEL_CHOICE,
    describe,
    kind_label,
    model_lines,
    models_summary,
    short,
)

CONTENT_LIMIT = 2000  # Discord's maximum message length
PROMPT_SHOWN = 300  # prompt characters shown in a caption: the parameters must stay visible


def ts(when: datetime) -> str:
    """A Discord timestamp: every user sees it in their own time zone. Naive times are UTC."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return f"<t:{int(when.timestamp())}:f>"


def caption(job: JobView) -> str:
    """Result message: prompt, parameters, who asked. The buttons below it say what it can become
    (the reactions 🔁 and 1️⃣-4️⃣ / 🎨 still work, without being added to every result)."""
    lines = [f"**{short(job.prompt, PROMPT_SHOWN)}**"]
    if job.negative_prompt:
        lines.append(f"not: {short(job.negative_prompt, 200)}")
    lines.append(f"{describe(job)} · job #{job.id}")
    lines.append(f"requested by <@{job.user_id}>")
    return short("\n".join(lines), CONTENT_LIMIT)


def queued(job: JobView, position: int | None) -> str:
    if position is None:
        return f"⏳ <@{job.user_id}> **{short(job.prompt, PROMPT_SHOWN)}** — queued."
    if position <= 1:
        ahead = "starts next"
    else:
        ahead = f"position {position} in the queue"
    return f"⏳ <@{job.user_id}> **{short(job.prompt, PROMPT_SHOWN)}** — queued, {ahead}."


def waiting(job: JobView, message: str) -> str:
    return f"⏳ <@{job.user_id}> **{short(job.prompt, PROMPT_SHOWN)}** — {message}"


def progress(job: JobView, step: int, total: int) -> str:
    if total <= 0 or step <= 0:
        return f"🎨 <@{job.user_id}> **{short(job.prompt, PROMPT_SHOWN)}** — generating…"
    filled = round(10 * step / total)
    bar = "▰" * filled + "▱" * (10 - filled)
    return f"🎨 <@{job.user_id}> **{short(job.prompt, PROMPT_SHOWN)}** — {bar} step {step}/{total}"


def cancelled(job: JobView) -> str:
    return f"🚫 <@{job.user_id}> **{short(job.prompt, PROMPT_SHOWN)}** — cancelled (job #{job.id}; nothing was charged)."


def not_cancelled(job: JobView) -> str:
    if job.state == "succeeded":
        return f"⛔ Job #{job.id} has finished already: too late to cancel."
    return f"⛔ Job #{job.id} is {job.state} already: there is nothing to cancel."


def failed(job: JobView, message: str) -> str:
    return f"❌ <@{job.user_id}> **{short(job.prompt, PROMPT_SHOWN)}** — {message}"


def quota(q: QuotaView) -> str:
    source = {
        "user": "your own limit",
        "role": "your roles' highest limit",
        "guild": "this server's limit",
        "global": "the default limit",
    }[q.limit_source]
    lines = [
        f"You have used **{q.used_today}** of **{q.daily_limit}** images today ({source}).",
        f"Left now: **{q.remaining}**"
        + (f" (including {q.bonus_credits} bonus credits)." if q.bonus_credits else "."),
        f"Resets {ts(q.reset_at)}.",
    ]
    if q.banned:
        lines.insert(0, "You are banned from generating images here.")
    return "\n".join(lines)


def jump_url(job: JobView) -> str | None:
    if not job.result_message_id or not job.channel_id:
        return None
    return f"https://discord.com/channels/{job.guild_id or '@me'}/{job.channel_id}/{job.result_message_id}"


def history(jobs: Sequence[JobView]) -> str:
    if not jobs:
        return "You have no images yet. Try `/imagine`."
    lines = ["Your latest jobs:"]
    for job in jobs:
        url = jump_url(job)
        state = {"succeeded": "✅", "failed": "❌", "cancelled": "🚫", "queued": "⏳", "running": "🎨"}[
            job.state
        ]
        label = kind_label(job)
        what = f"{label} of #{job.parent_id} " if label and job.parent_id else (f"{label} " if label else "")
        line = f"{state} #{job.id} {ts(job.created_at)} {what}**{short(job.prompt, 80)}** (seed {job.params.seed})"
        lines.append(line + (f" — {url}" if url else ""))
    return short("\n".join(lines), CONTENT_LIMIT)


def stats(s: StatsView) -> str:
    states = ", ".join(f"{k}: {v}" for k, v in sorted(s.jobs_by_state.items())) or "none"
    lines = [f"Images today: **{s.images_today}** · queue depth: **{s.queue_depth}**", f"Jobs: {states}"]
    if s.top_users:
        lines.append("Top today: " + ", ".join(f"<@{u.user_id}> {u.images}" for u in s.top_users))
    return "\n".join(lines)


def models(listing: ModelListing) -> str:
    """/models: every model allowed here with its LoRAs, the default first."""
    if not listing.choice:
        return NO_MODEL_CHOICE
    if not listing.models:
        return "No model is allowed here now: ask this server's admins (/admin allow-models)."
    lines = [
        "**Models you can use here**" + (" (chosen by this server's admins)" if listing.restricted else "")
    ]
    for line in model_lines(listing):
        name, _, rest = line.partition(" — ")
        lines.append(f"• **{name}** — {rest}")
    lines.append(
        MODEL_USAGE.replace("--model NAME", "`--model NAME`").replace(
            "--lora NAME:WEIGHT", "`--lora NAME:WEIGHT`"
        )
    )
    return short("\n".join(lines), CONTENT_LIMIT)


def help_text(listing: ModelListing | None, rules: PlaceRules | None = None) -> str:
    """/help, with the models available here and this channel's rules (or without them when the
    core could not say)."""
    text = HELP
    if listing is not None:
        text += "\n**Models**: " + models_summary(listing) + " **/models** lists their LoRAs."
    if rules is not None:
        text += "\n" + place_rules(rules)
    return short(text, CONTENT_LIMIT)


def place_rules(rules: PlaceRules) -> str:
    """What applies in this channel, for /help."""
    lines = []
    if not rules.allowed:
        lines.append("Image commands are not allowed here; use " + _channels(rules.allowed_channels) + ".")
    if rules.private:
        lines.append("**Private mode**: results here are shown only to whoever asked.")
    d = rules.defaults
    if not d.empty:
        lines.append("**Defaults here** (flags override them): " + _defaults(d) + ".")
    return "\n".join(lines)


def settings(s: PlaceSettings) -> str:
    """/admin settings: every channel and role setting of the server."""
    lines = [
        "**Image commands allowed in**: "
        + (_channels(s.allowed_channels) if s.allowed_channels else "every channel"),
        "**Private mode**: "
        + ("on for the whole server" if s.private_guild else "off for the server")
        + "".join(f"; <#{c}> {'on' if on else 'off'}" for c, on in s.private_channels.items()),
    ]
    for channel, d in s.defaults.items():
        lines.append(f"**Defaults in <#{channel}>**: {_defaults(d)}")
    if s.role_limits:
        lines.append(
            "**Role limits** (a member gets their roles' highest; a user limit wins): "
            + ", ".join(f"<@&{role}> {limit}/day" for role, limit in s.role_limits.items())
        )
    else:
        lines.append("**Role limits**: none")
    return short("\n".join(lines), CONTENT_LIMIT)


def _channels(ids: tuple[str, ...]) -> str:
    return ", ".join(f"<#{c}>" for c in ids)


def _defaults(d: ChannelDefaults) -> str:
    parts = []
    if d.model:
        parts.append(f"model `{d.model}`")
    if d.aspect_ratio:
        parts.append(f"`--ar {d.aspect_ratio}`")
    if d.steps:
        parts.append(f"`--steps {d.steps}`")
    return ", ".join(parts)


HELP = """\
**/imagine** `prompt` — generate images. Options: `negative`, `count` (1-4), `seed`, `steps`, `aspect`, \
`guidance`, `model`, `lora`, and `image` to start from a picture of yours (with `strength`, 0-1: how far it may stray).
The same flags also work inside the prompt: `--seed 42 --n 4 --ar 3:2 --steps 30 --guidance 7 --no blurry --strength 0.6 \
--model NAME --lora NAME:0.8`.
**/inpaint** `image` `prompt` [`mask`] — repaint part of an image: white in the mask is repainted. \
Without a mask, the image's transparent pixels are repainted.
**/history** — your latest results with links. **/quota** — your usage today and when it resets.
Under a result: **U1-U4** upscale 2x, **V1-V4** a variation of that image, 🔁 re-roll (new seed), \
✏️ **Remix** (edit the prompt and flags, then vary); under a single image also **Vary (Strong/Subtle)**, \
**Zoom Out 2x/1.5x** and ⬅️➡️⬆️⬇️ pan. **Cancel** on a waiting or running job. Reactions 🔁 and \
1️⃣-4️⃣ (🎨 for one image) work too. A new job counts against the quota of whoever asks for it.
**/admin** (Manage Server or an admin role) — limits, credits, usage reset, ban/unban, stats, \
this server's default model and allowed models and LoRAs, allowed channels, channel defaults, private mode, \
role limits (**/admin settings** lists them)."""
