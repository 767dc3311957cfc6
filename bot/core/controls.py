"""The buttons of a result and of a status message, the same on every platform.

Which controls a job offers, in which rows, and what each one does is decided here; the adapters
draw them (Discord components, Slack Block Kit, the playground's buttons) and send back the
control's id. An id names the operation, the job and the argument (`imagine:up:42:0`): it holds no
other state, so a button works after a restart (the job id resolves to the row, and the core checks
who may use it as for a reaction).

Layout (Discord allows 5 rows of 5 buttons, Slack 25 elements per actions block):
- a result of several images: U1-U4 | V1-V4 | re-roll, remix; the per-image buttons for the images
  it has;
- a result of one image: upscale, vary (strong), vary (subtle), re-roll, remix | zoom out 2x, 1.5x
  | pan left, right, up, down (zooms and pans work on one image, as upscaling first gives);
- a queued or running job: cancel.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from bot.core.api import BadParameters, JobView

Style = Literal["primary", "secondary", "danger"]
PREFIX = "imagine"
# op codes as they travel in ids (short: a Discord custom_id holds 100 characters)
OPS = ("up", "var", "vary", "reroll", "zoom", "pan", "remix", "cancel")
CONTROL_ID = re.compile(
    rf"{PREFIX}:(?P<op>{'|'.join(OPS)}):(?P<job>[0-9]{{1,19}})(?::(?P<arg>[a-z0-9.]{{1,8}}))?"
)


@dataclass(frozen=True)
class Control:
    op: str
    arg: str
    label: str
    emoji: str | None = None
    style: Style = "secondary"

    def id_for(self, job_id: int) -> str:
        return f"{PREFIX}:{self.op}:{job_id}" + (f":{self.arg}" if self.arg else "")


@dataclass(frozen=True)
class Pressed:
    """A control id taken apart: the operation, the job it belongs to, its argument."""

    op: str
    job_id: int
    arg: str


def parse(control_id: str) -> Pressed | None:
    """The control an id names, or None for an id that is not one of ours."""
    m = CONTROL_ID.fullmatch(control_id or "")
    if m is None:
        return None
    return Pressed(m["op"], int(m["job"]), m["arg"] or "")


REROLL = Control("reroll", "", "Re-roll", "\U0001f501")
REMIX = Control("remix", "", "Remix", "\u270f\ufe0f")
CANCEL = Control("cancel", "", "Cancel", "\u2716\ufe0f", "danger")


def result_controls(job: JobView) -> list[list[Control]]:
    """The rows of buttons under a succeeded job's result."""
    n = len(job.images) or job.params.n
    if n > 1:
        return [
            [Control("up", str(i), f"U{i + 1}", style="primary") for i in range(n)],
            [Control("var", str(i), f"V{i + 1}") for i in range(n)],
            [REROLL, REMIX],
        ]
    return [
        [
            Control("up", "0", "Upscale", "\U0001f50d", "primary"),
            Control("vary", "strong", "Vary (Strong)", "\U0001fa84"),
            Control("vary", "subtle", "Vary (Subtle)", "\U0001fa84"),
            REROLL,
            REMIX,
        ],
        [
            Control("zoom", "2", "Zoom Out 2x", "\U0001f50e"),
            Control("zoom", "1.5", "Zoom Out 1.5x", "\U0001f50e"),
        ],
        [
            Control("pan", "left", "Pan left", "\u2b05\ufe0f"),
            Control("pan", "right", "Pan right", "\u27a1\ufe0f"),
            Control("pan", "up", "Pan up", "\u2b06\ufe0f"),
            Control("pan", "down", "Pan down", "\u2b07\ufe0f"),
        ],
    ]


def status_controls(job: JobView) -> list[list[Control]]:
    """The rows of buttons on a job's status message while it waits or runs."""
    return [[CANCEL]] if not job.done else []


async def press(
    service: Any,
    actor: Any,
    place: Any,
    pressed: Pressed,
    *,
    message_id: str | None,
    idempotency_key: str,
    delivery: Mapping[str, Any] | None,
) -> JobView:
    """Start the job a result's control asks for (not remix, which needs the edited text, nor cancel),
    by the job id in the control and the message it sits on."""
    op, arg = pressed.op, pressed.arg
    ref: dict[str, Any] = {
        "job_id": pressed.job_id,
        "message_id": message_id,
        "idempotency_key": idempotency_key,
        "delivery": delivery,
    }
    if op == "reroll":
        return await service.reroll(actor, place, **ref)
    if op == "var":
        return await service.variation(actor, place, _index(arg), **ref)
    if op == "vary":
        return await service.variation(actor, place, 0, subtle=arg == "subtle", **ref)
    if op == "up":
        return await service.upscale(actor, place, _index(arg), **ref)
    if op == "zoom":
        return await service.zoom_out(actor, place, _factor(arg), **ref)
    if op == "pan":
        return await service.pan(actor, place, arg, **ref)
    raise BadParameters("control", f"The {op} button does not start a job by itself.", op)


def _index(arg: str) -> int:
    if not arg.isdigit():
        raise BadParameters("image", f"That button names no image ({arg!r}).", arg)
    return int(arg)


def _factor(arg: str) -> float:
    try:
        return float(arg)
    except ValueError:
        raise BadParameters("factor", f"That button names no zoom factor ({arg!r}).", arg) from None
