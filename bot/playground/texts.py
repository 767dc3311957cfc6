"""What playground users read. Plain functions of core values; the one place core errors become text."""

from __future__ import annotations

import base64
import html
import logging
from collections.abc import Sequence

from bot.core.api import BadParameters, CoreError, JobView, ModelListing, QuotaView, StatsView
from bot.core.describe import (
    MODEL_USAGE,
    NO_MODEL_CHOICE,
    describe,
    kind_label,
    model_lines,
    models_summary,
    short,
)

log = logging.getLogger("bot.playground")

PROMPT_SHOWN = 300  # prompt characters shown in a caption: the parameters must stay visible

HELP = """\
**/imagine** `prompt` — generate images (typing just the prompt works too). The same flags as in \
Discord and Slack: `--seed 42 --n 4 --ar 3:2 --steps 30 --guidance 7 --no blurry`.
Pick a model in the **Model** list (it writes `--model NAME` into the box) and add LoRAs with \
`--lora NAME:WEIGHT`; **/models** lists them.
**/quota** — your usage today · **/history** — your latest jobs · **/models** — the models and LoRAs · \
**/help** — this text.
Under a result: **🔁 Re-roll** (same prompt, new seed), **V1-V4** (a variation of that image), \
**U1-U4** (that image upscaled 2x), **✏️ Remix** (type the new prompt and flags in the box, then press \
it); under a single image also **Vary (Strong/Subtle)**, **Zoom Out 2x/1.5x** and ⬅️➡️⬆️⬇️ pan. \
**Cancel my job** stops your latest waiting or running job. The **Inpaint** tab repaints what you \
paint over with the brush."""

NO_MODELS_NOW = "The list of models can't be read right now; try again in a moment."

REMIX_HOW = "Type the prompt and flags to remix with in the box (e.g. `a blue kite --strength 0.5`), then press Remix."


def pressed(label: str, job_id: int) -> str:
    """The chat line for a button pressed under job `job_id`'s result."""
    return f"{label} on job #{job_id}"


def error_text(error: BaseException) -> str:
    """Every refusal the user sees goes through here; anything that is not a CoreError is a bug."""
    if isinstance(error, BadParameters):
        return f"⚠️ {error.message}"
    if isinstance(error, CoreError):
        return f"⚠️ {error.message}"
    log.error("playground handler failed", exc_info=error)
    return "⚠️ Something went wrong on our side; it has been logged. Please try again."


def caption(job: JobView) -> str:
    lines = [f"**{short(job.prompt, PROMPT_SHOWN)}**"]
    if job.negative_prompt:
        lines.append(f"not: {short(job.negative_prompt, 200)}")
    lines.append(f"{describe(job)} · job #{job.id}")
    if job.params.n > 1:
        lines.append("🔁 Re-roll, V1-V4 for a variation of that image, U1-U4 to upscale it, or ✏️ Remix.")
    else:
        lines.append("🔁 Re-roll, V1 / Vary for a variation, U1 to upscale, Zoom Out, pan, or ✏️ Remix.")
    return "\n".join(lines)


def queued(job: JobView, position: int | None) -> str:
    if position is None:
        ahead = "waiting for its turn"
    else:
        ahead = "starts next" if position <= 1 else f"position {position} in the queue"
    return f"⏳ **{short(job.prompt, PROMPT_SHOWN)}** — job #{job.id} queued, {ahead}."


def waiting(job: JobView, message: str) -> str:
    return f"⏳ **{short(job.prompt, PROMPT_SHOWN)}** — job #{job.id} {message}."


def bar(step: int, total: int) -> str:
    filled = round(10 * step / total) if total > 0 else 0
    return "▰" * filled + "▱" * (10 - filled)


def progress(job: JobView, step: int, total: int) -> str:
    if total <= 0 or step <= 0:
        return f"🎨 **{short(job.prompt, PROMPT_SHOWN)}** — job #{job.id} generating…"
    return f"🎨 **{short(job.prompt, PROMPT_SHOWN)}** — {bar(step, total)} step {step}/{total}"


def failed(job: JobView, message: str) -> str:
    return f"❌ **{short(job.prompt, PROMPT_SHOWN)}** — job #{job.id} failed: {message}"


def status_html(
    state: str, text: str, job_id: int | None = None, step: int = 0, total: int = 0, preview: bytes = b""
) -> str:
    """The status panel: a real <progress> bar while a job runs (data-state is for the tests), and
    the live preview of the first image when the server sent one (an inline PNG of a few KB)."""
    meter = ""
    if state == "running":
        if total > 0:
            meter = f'<progress value="{step}" max="{total}" style="width:100%"></progress>'
        else:
            meter = '<progress style="width:100%"></progress>'
    if state == "running" and preview:
        data = base64.b64encode(preview).decode("ascii")
        meter += f'<img class="job-preview" alt="preview" width="128" src="data:image/png;base64,{data}">'
    job_attr = f' data-job="{job_id}"' if job_id is not None else ""
    return (
        f'<div class="job-status" data-state="{html.escape(state)}"{job_attr}>'
        f"<p>{html.escape(text)}</p>{meter}</div>"
    )


def quota(q: QuotaView) -> str:
    source = {
        "user": "your own limit",
        "role": "your roles' limit",
        "guild": "the workspace limit",
        "global": "the default limit",
    }[q.limit_source]
    line = (
        f"**{q.remaining}** image(s) left · used **{q.used_today}** of **{q.daily_limit}** today "
        f"({source}) · resets {q.reset_at:%Y-%m-%d %H:%M} UTC"
    )
    if q.bonus_credits:
        line += f" · {q.bonus_credits} bonus credits"
    if q.banned:
        line = "🚫 You are banned from generating images here. " + line
    return line


def quota_of(q: QuotaView) -> str:
    return f"`{q.user_id}`: " + quota(q).replace("your own limit", "own limit")


def history(jobs: Sequence[JobView]) -> str:
    if not jobs:
        return "You have no images yet. Try `/imagine a lighthouse at dusk`."
    icons = {"succeeded": "✅", "failed": "❌", "cancelled": "🚫", "queued": "⏳", "running": "🎨"}
    lines = ["Your latest jobs:"]
    for job in jobs:
        label = kind_label(job)
        what = f"{label} of #{job.parent_id} " if label and job.parent_id else (f"{label} " if label else "")
        lines.append(
            f"- {icons[job.state]} #{job.id} {job.created_at:%m-%d %H:%M} {what}**{short(job.prompt, 80)}** "
            f"(seed {job.params.seed})"
        )
    return "\n".join(lines)


def stats(s: StatsView) -> str:
    states = ", ".join(f"{k}: {v}" for k, v in sorted(s.jobs_by_state.items())) or "none"
    lines = [f"Images today: **{s.images_today}** · queue depth: **{s.queue_depth}**", f"Jobs: {states}"]
    if s.top_users:
        lines.append("Top today: " + ", ".join(f"`{u.user_id}` {u.images}" for u in s.top_users))
    return "\n\n".join(lines)


def models(listing: ModelListing) -> str:
    """/models and the Models panel: every model with its LoRAs, the default first."""
    if not listing.choice:
        return NO_MODEL_CHOICE
    lines = [f"- **{name}** — {rest}" for name, _, rest in (x.partition(" — ") for x in model_lines(listing))]
    return "\n".join(["**Models**", *lines, "", MODEL_USAGE])


def help_text(listing: ModelListing | None) -> str:
    if listing is None or not listing.choice:
        return HELP
    return f"{HELP}\n**Models**: {models_summary(listing)}"
