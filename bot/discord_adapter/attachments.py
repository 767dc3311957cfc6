"""Images users attach to a command (/inpaint, /imagine's starting image): checked and downloaded.

The adapter checks what Discord tells about the file (type, declared size) and the bytes that
arrive (real size); whether they are a usable image is the core's call (BadParameters naming it).
"""

from __future__ import annotations

import discord

from bot.discord_adapter.errors import AttachmentError

IMAGE_TYPES = {"image/png", "image/jpeg", "image/webp"}  # what the inference server decodes
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


async def read_image(field: str, attachment: discord.Attachment, limit: int) -> bytes:
    """The attachment's bytes, or a clear refusal naming the option and the file."""
    ctype = (attachment.content_type or "").split(";")[0].strip().lower()
    if ctype not in IMAGE_TYPES and not (not ctype and attachment.filename.lower().endswith(IMAGE_SUFFIXES)):
        raise AttachmentError(
            field,
            f"`{attachment.filename}` ({field}) is not a PNG, JPEG or WebP image.",
            attachment.filename,
        )
    if attachment.size > limit:
        raise AttachmentError(
            field,
            f"`{attachment.filename}` ({field}) is {attachment.size / 2**20:.1f} MiB; "
            f"the limit is {limit / 2**20:.1f} MiB.",
            attachment.size,
        )
    try:
        data = await attachment.read()
    except discord.HTTPException as e:
        raise AttachmentError(field, f"Could not download `{attachment.filename}` ({field}).") from e
    if len(data) > limit:  # the declared size can lie
        raise AttachmentError(
            field, f"`{attachment.filename}` ({field}) is larger than {limit / 2**20:.1f} MiB.", len(data)
        )
    return data
