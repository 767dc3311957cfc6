"""The core's controls (`bot.core.controls`) as Discord buttons, and the remix dialog.

Every button is a `DynamicItem` whose custom id is the control's id (`imagine:up:42:0`): discord.py
matches a click against the template, whatever message it is on and whether or not this process
sent it, so buttons work after a restart without keeping a view per message in memory. The remix
dialog is answered the same way, by its custom id (`imagine:remixform:42`), in `cogs/buttons.py`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import discord

from bot.core.api import JobView
from bot.core.controls import CONTROL_ID, Control, parse, result_controls, status_controls

if TYPE_CHECKING:
    from bot.discord_adapter.bot import ImagineBot

REMIX_FORM = re.compile(r"imagine:remixform:(?P<job>[0-9]{1,19})")
REMIX_TEXT = "text"
REMIX_IMAGE = "image"
# Discord's text input holds at most 4000 characters; a prompt and its flags stay far below.
REMIX_MAX_CHARS = 1500

_STYLES = {
    "primary": discord.ButtonStyle.primary,
    "secondary": discord.ButtonStyle.secondary,
    "danger": discord.ButtonStyle.danger,
}


class ControlButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=CONTROL_ID):
    """Any of our buttons: the click goes to the bot's `on_control` with the control it names."""

    def __init__(self, button: discord.ui.Button[Any], row: int | None = None):
        super().__init__(button, row=row)
        pressed = parse(button.custom_id or "")
        if pressed is None:
            raise ValueError(f"{button.custom_id!r} is not a control id")
        self.pressed = pressed

    @classmethod
    def of(cls, control: Control, job_id: int, row: int | None = None) -> ControlButton:
        button: discord.ui.Button[Any] = discord.ui.Button(
            label=control.label or None,
            emoji=control.emoji,
            style=_STYLES[control.style],
            custom_id=control.id_for(job_id),
        )
        return cls(button, row=row)

    @classmethod
    async def from_custom_id(  # type: ignore[override]
        cls, interaction: discord.Interaction, item: discord.ui.Button[Any], match: re.Match[str], /
    ) -> ControlButton:
        return cls(item)

    async def callback(self, interaction: discord.Interaction) -> None:  # type: ignore[override]
        bot: ImagineBot = interaction.client  # type: ignore[assignment]
        await bot.on_control(interaction, self.pressed)


def _view(rows: list[list[Control]], job_id: int) -> discord.ui.View | None:
    if not rows:
        return None
    view = discord.ui.View(timeout=None)
    for r, row in enumerate(rows):
        for control in row:
            view.add_item(ControlButton.of(control, job_id, row=r))
    return view


def result_view(job: JobView) -> discord.ui.View | None:
    return _view(result_controls(job), job.id)


def status_view(job: JobView) -> discord.ui.View | None:
    return _view(status_controls(job), job.id)


class RemixModal(discord.ui.Modal):
    """The prompt and flags to remix with, prefilled with the parent's; which image for several."""

    def __init__(self, job: JobView | None, job_id: int, text: str):
        super().__init__(title="Remix", custom_id=f"imagine:remixform:{job_id}", timeout=None)
        self.add_item(
            discord.ui.TextInput(
                label="Prompt and flags",
                custom_id=REMIX_TEXT,
                style=discord.TextStyle.paragraph,
                default=text[:REMIX_MAX_CHARS] or None,
                max_length=REMIX_MAX_CHARS,
                placeholder="a lighthouse at dusk, oil painting --steps 30 --strength 0.7",
            )
        )
        n = len(job.images) if job is not None else 1
        if n > 1:
            self.add_item(
                discord.ui.TextInput(
                    label=f"Image to start from (1-{n})",
                    custom_id=REMIX_IMAGE,
                    default="1",
                    max_length=1,
                    min_length=1,
                )
            )


def modal_values(data: Any) -> dict[str, str]:
    """custom_id -> value of the text inputs of a modal submit (action rows, or the newer labels)."""
    values: dict[str, str] = {}

    def walk(components: Any) -> None:
        for c in components or []:
            if not isinstance(c, dict):
                continue
            if "custom_id" in c and "value" in c:
                values[str(c["custom_id"])] = str(c["value"] or "")
            walk(c.get("components"))
            if isinstance(c.get("component"), dict):
                walk([c["component"]])

    walk((data or {}).get("components"))
    return values
