"""Every text the Slack adapter shows, and the ONE place where core errors become user messages."""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

from bot.core.api import (
    BadParameters,
    CoreError,
    JobView,
    ModelListing,
    PlaceRules,
    PlaceSettings,
    QuotaExceeded,
    QuotaView,
    StatsView,
)
from bot.core.controls import Control, result_controls, status_controls
from bot.core.describe import MODEL_USAGE, NO_MODEL_CHOICE, kind_label, model_lines, models_summary

log = logging.getLogger("bot.slack")


# Slack markup in incoming text: <@U123|name>, <#C123|name>, <!here>, <https://x|label>, <https://x>.
_MARKUP = re.compile(r"<([@#!]?)([^>|]+)(?:\|([^>]*))?>")


def plain_text(text: str) -> str:
    """What the user typed, from Slack's wire format: mentions and links as their visible text and
    the HTML entities Slack always escapes (&, <, >) decoded, so prompts reach the model as typed."""

    def visible(m: re.Match[str]) -> str:
        sigil, target, label = m.groups()
        if sigil in ("@", "#", "!"):
            return ("#" if sigil == "#" else "@") + (label or target)
        return label or target

    text = _MARKUP.sub(visible, text)
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def escape(text: str) -> str:
    """Slack mrkdwn control characters; user text must not turn into mentions or links."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def error_text(exc: BaseException) -> str:
    """A short message for the user. Core errors carry their own; anything else is a bug: the
    traceback goes to the log with a reference the user can quote."""
    if isinstance(exc, BadParameters):
        return f":warning: {exc.message}"
    if isinstance(exc, QuotaExceeded):
        return f":hourglass: {exc.message}"
    if isinstance(exc, CoreError):
        return f":no_entry: {exc.message}"
    ref = uuid.uuid4().hex[:8]
    log.error("slack: unexpected error (ref %s)", ref, exc_info=exc)
    return f":boom: Something went wrong on our side (ref `{ref}`). The admins can find it in the log."


def describe_params(job: JobView) -> str:
    p = job.params
    parts = [f"seed {p.seed}" if p.n == 1 else f"seeds {p.seeds[0]}–{p.seeds[-1]}", f"{p.width}×{p.height}"]
    parts += [f"{p.steps} steps", f"guidance {p.guidance:g}"]
    if p.n > 1:
        parts.append(f"{p.n} images")
    if p.strength is not None:
        parts.append(f"strength {p.strength:g}")
    if p.model:
        parts.append(f"model {escape(p.model)}")
    if p.loras:
        parts.append("lora " + escape(", ".join(f"{x.name}:{x.weight:g}" for x in p.loras)))
    if job.negative_prompt:
        parts.append(f"no: {escape(job.negative_prompt)}")
    return " · ".join(parts)


def headline(job: JobView) -> str:
    label = kind_label(job)
    return f"<@{job.user_id}> {label + ' ' if label else ''}*{escape(job.prompt)}*"


def queued_text(job: JobView, position: int | None) -> str:
    where = f"queued, position {position}" if position else "queued"
    return f":hourglass_flowing_sand: {headline(job)} — {where}"


def waiting_text(job: JobView, message: str) -> str:
    return f":hourglass_flowing_sand: {headline(job)} — {message}"


def progress_text(job: JobView, step: int, total: int) -> str:
    if step <= 0 or total <= 0:
        return f":art: {headline(job)} — started"
    filled = round(10 * step / total)
    bar = "▰" * filled + "▱" * (10 - filled)
    return f":art: {headline(job)} — {bar} step {step}/{total}"


def failed_text(job: JobView, message: str) -> str:
    return f":x: {headline(job)} — failed: {escape(message)}"


def result_comment(job: JobView) -> str:
    """The text of a result: who asked for what, with which parameters (the buttons say the rest)."""
    return f"{headline(job)}\n{describe_params(job)} · job #{job.id}"


def cancelled_text(job: JobView) -> str:
    return f":no_entry_sign: {headline(job)} — cancelled (nothing was charged)."


def not_cancelled_text(job: JobView) -> str:
    if job.state == "succeeded":
        return f":warning: Job #{job.id} has finished already: too late to cancel."
    return f":warning: Job #{job.id} is {job.state} already: there is nothing to cancel."


# Slack allows 75 characters of button text and 25 elements per actions block.
_STYLE = {"primary": "primary", "danger": "danger"}


def _button(control: Control, job_id: int) -> dict[str, Any]:
    text = f"{control.emoji} {control.label}".strip() if control.emoji else control.label
    button: dict[str, Any] = {
        "type": "button",
        "text": {"type": "plain_text", "text": text[:75], "emoji": True},
        "action_id": control.id_for(job_id),
        "value": control.id_for(job_id),
    }
    if control.style in _STYLE:
        button["style"] = _STYLE[control.style]
    return button


def _actions(rows: list[list[Control]], job_id: int) -> list[dict[str, Any]]:
    return [
        {
            "type": "actions",
            "block_id": f"imagine_controls_{r}",
            "elements": [_button(c, job_id) for c in row],
        }
        for r, row in enumerate(rows)
    ]


def result_blocks(job: JobView) -> list[dict[str, Any]]:
    """A result's text and its buttons (U1-U4, V1-V4, vary, re-roll, remix, zoom out, pan)."""
    section = {"type": "section", "text": {"type": "mrkdwn", "text": result_comment(job)[:3000]}}
    return [section, *_actions(result_controls(job), job.id)]


def status_blocks(job: JobView, text: str, active: bool) -> list[dict[str, Any]]:
    """A status message's text, with its Cancel button while the job waits or runs."""
    section = {"type": "section", "text": {"type": "mrkdwn", "text": text[:3000]}}
    return [section, *(_actions(status_controls(job), job.id) if active else [])]


def quota_text(q: QuotaView, who: str = "You") -> str:
    lines = [
        f"{who}: {q.remaining} image(s) left ({q.used_today}/{q.daily_limit} used today, "
        f"limit from {q.limit_source}; {q.bonus_credits} bonus credit(s)).",
        f"Resets at {q.reset_at.strftime('%Y-%m-%d %H:%M UTC')}.",
    ]
    if q.banned:
        lines.append("Banned.")
    return " ".join(lines)


def stats_text(s: StatsView) -> str:
    states = ", ".join(f"{k}: {v}" for k, v in sorted(s.jobs_by_state.items())) or "no jobs yet"
    top = ", ".join(f"<@{u.user_id}> {u.images}" for u in s.top_users) or "nobody yet"
    return (
        f"*Stats* — images today: {s.images_today}, queue depth: {s.queue_depth}\n"
        f"Jobs by state: {states}\nTop users today: {top}"
    )


def models_text(listing: ModelListing, command: str | None = None) -> str:
    """`/imagine models`: every model allowed here with its LoRAs, the default first."""
    if not listing.choice:
        return NO_MODEL_CHOICE
    if not listing.models:
        return "No model is allowed here now: ask this workspace's admins."
    lines = [
        "*Models you can use here*" + (" (chosen by this workspace's admins)" if listing.restricted else "")
    ]
    for line in model_lines(listing):
        name, _, rest = line.partition(" — ")
        lines.append(f"• *{escape(name)}* — {escape(rest)}")
    lines.append(MODEL_USAGE)
    return "\n".join(lines)


def imagine_help(command: str, listing: ModelListing | None = None, rules: PlaceRules | None = None) -> str:
    models = ""
    if listing is not None:
        models = f"Models: {escape(models_summary(listing))} `{command} models` lists their LoRAs.\n"
    if rules is not None:
        models += place_rules_text(rules)
    return (
        f"*{command} <prompt> [flags]* — generate an image.\n"
        "Flags: `--seed N` `--n 1-4` `--ar W:H` `--no <negative prompt>` `--steps N` `--guidance G` "
        "`--model NAME` `--lora NAME:WEIGHT` `--strength 0-1` (with an image to start from)\n"
        + models
        + f"Example: `{command} a lighthouse at dusk, oil painting --ar 3:2 --n 2`\n"
        f"`{command} quota` shows what you have left today, `{command} history` your last jobs, `{command} models` the models.\n"
        "Start from your own picture: post it and mention me with the prompt "
        "(`@imagine a watercolour version --strength 0.6`).\n"
        "Inpaint: post an image (transparent areas get repainted, or add a second image named "
        "`mask`: white = repaint) and mention me with `inpaint <prompt>`, or use the "
        "*Inpaint…* shortcut on a message with an image.\n"
        "Under a result: U1–U4 upscale, V1–V4 vary, re-roll, Remix (edit the prompt), and for one "
        "image Vary (Strong/Subtle), Zoom Out 2x/1.5x and pan; Cancel on a waiting job. "
        "Reactions :repeat:, :one:–:four: and :art: work too."
    )


def admin_help(command: str) -> str:
    return (
        f"*{command}* subcommands (admins only):\n"
        f"• `{command} usage @user` — a user's usage and limits\n"
        f"• `{command} limits @user <n|none>` — per-user daily limit (`none` removes it)\n"
        f"• `{command} limits workspace <n|none>` — default daily limit for this workspace\n"
        f"• `{command} credits @user <amount>` — grant bonus images\n"
        f"• `{command} reset @user` — reset today's usage\n"
        f"• `{command} ban @user [reason]` / `{command} unban @user`\n"
        f"• `{command} stats` — jobs, images today, top users, queue depth\n"
        f"• `{command} default-model <name|none>` — the model this workspace's jobs get by default\n"
        f"• `{command} allow-models <names…|all>` / `{command} allow-loras <names…|all>` — "
        "allow only these models or LoRAs here\n"
        f"• `{command} channels <#channel…|all>` — image commands only in these channels (`all`: everywhere)\n"
        f"• `{command} channel-defaults [#channel] model=NAME ar=W:H steps=N` (or `none`) — "
        "a channel's defaults; flags in a prompt override them\n"
        f"• `{command} private <on|off|default> [#channel|workspace]` — results only to whoever asked "
        "(they arrive in a DM with the bot)\n"
        f"• `{command} settings` — the channel settings of this workspace. Slack has no roles: "
        "limits are per user and per workspace"
    )


def place_rules_text(rules: PlaceRules) -> str:
    """What applies in this channel, for help: where allowed, private mode, the channel's defaults."""
    lines = []
    if not rules.allowed:
        where = ", ".join(f"<#{c}>" for c in rules.allowed_channels)
        lines.append(f"Image commands are not allowed here; use {where}.")
    if rules.private:
        lines.append("Private mode: results here go to your DM with me.")
    d = rules.defaults
    if not d.empty:
        parts = [f"model {d.model}" if d.model else "", f"--ar {d.aspect_ratio}" if d.aspect_ratio else "",
                 f"--steps {d.steps}" if d.steps else ""]  # fmt: skip
        lines.append("Defaults here (flags override them): " + ", ".join(p for p in parts if p) + ".")
    return "".join(line + "\n" for line in lines)


PRIVATE_NOTE = "Private mode: the result will arrive in your DM with me."
PRIVATE_DELIVERED = ":lock: Your result is in your DM with me (private mode)."


def settings_text(s: PlaceSettings) -> str:
    """`/imagine-admin settings`: the workspace's channel settings (no roles on Slack)."""
    allowed = ", ".join(f"<#{c}>" for c in s.allowed_channels) or "every channel"
    private = (
        ("on" if s.private_guild else "off")
        + " for the workspace"
        + "".join(f"; <#{c}> {'on' if on else 'off'}" for c, on in s.private_channels.items())
    )
    lines = [f"*Image commands allowed in*: {allowed}", f"*Private mode*: {private}"]
    for channel, d in s.defaults.items():
        parts = [f"model {d.model}" if d.model else "", f"--ar {d.aspect_ratio}" if d.aspect_ratio else "",
                 f"--steps {d.steps}" if d.steps else ""]  # fmt: skip
        lines.append(f"*Defaults in <#{channel}>*: " + ", ".join(p for p in parts if p))
    return "\n".join(lines)


def history_text(jobs: list[JobView]) -> str:
    if not jobs:
        return "You have no jobs yet."
    lines = [
        f"• #{j.id} {kind_label(j) or 'imagine'}{f' of #{j.parent_id}' if j.parent_id else ''} "
        f"*{escape(j.prompt)}* — {j.state}"
        for j in jobs
    ]
    return "Your latest jobs:\n" + "\n".join(lines)


def cannot_post_text(cancelled: bool) -> str:
    outcome = "so I cancelled the job (nothing was charged)" if cancelled else "so I can't show the result"
    return (
        f":lock: I'm not allowed to post in this conversation, {outcome}. "
        "Invite me with `/invite @imagine`, or use me in a public channel."
    )
