"""Turning the files of a Slack message into input: an image to inpaint (with an optional mask) or to
start an image-to-image job from.

The adapter checks only what it can see from Slack's file objects and the download (type, count,
size, that the bytes arrived); whether the pixels make a valid image/mask is the core's call, which
answers with BadParameters naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

IMAGE_TYPES = {"image/png", "image/jpeg", "image/webp"}
IMAGE_EXTENSIONS = {"png", "jpg", "jpeg", "webp"}


class AttachmentError(Exception):
    """A problem with the user's files; `.message` is shown to them as is."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class SlackFile:
    id: str
    name: str
    mimetype: str
    url: str
    size: int

    @classmethod
    def from_event(cls, f: Mapping[str, Any]) -> SlackFile:
        return cls(
            id=str(f.get("id", "")),
            name=str(f.get("name") or f.get("title") or f.get("id") or "file"),
            mimetype=str(f.get("mimetype") or ""),
            url=str(f.get("url_private_download") or f.get("url_private") or ""),
            size=_size(f.get("size")),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "mimetype": self.mimetype,
            "url": self.url,
            "size": self.size,
        }

    @property
    def is_image(self) -> bool:
        ext = self.name.rsplit(".", 1)[-1].lower() if "." in self.name else ""
        return self.mimetype in IMAGE_TYPES or (not self.mimetype and ext in IMAGE_EXTENSIONS)


def _size(value: Any) -> int:
    """Slack's declared size; anything odd counts as unknown (0): the download enforces the limit."""
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0


NO_IMAGE = (
    "Attach an image to inpaint: a PNG whose transparent areas get repainted, or an image plus a "
    "second image named `mask` (white = repaint, black = keep)."
)


def pick_image(files: Sequence[Mapping[str, Any]], max_bytes: int) -> SlackFile:
    """The one image a message carries to start an image-to-image job from."""
    image, mask = pick_image_and_mask(files, max_bytes)
    if mask is not None:
        raise AttachmentError(
            "Attach one image to start from; with an image and a mask, say `inpaint <prompt>`."
        )
    return image


def pick_image_and_mask(
    files: Sequence[Mapping[str, Any]], max_bytes: int
) -> tuple[SlackFile, SlackFile | None]:
    """(image, mask or None) from a message's files, or AttachmentError saying what is wrong."""
    parsed = [SlackFile.from_event(f) for f in files]
    if not parsed:
        raise AttachmentError(NO_IMAGE)
    not_images = [f.name for f in parsed if not f.is_image]
    if not_images:
        raise AttachmentError(f"`{not_images[0]}` is not an image I can use (PNG, JPEG or WebP). " + NO_IMAGE)
    if len(parsed) > 2:
        raise AttachmentError(
            f"Attach one image, or an image and a mask; this message has {len(parsed)} files."
        )
    for f in parsed:
        if f.size > max_bytes:
            raise AttachmentError(
                f"`{f.name}` is {f.size / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.0f} MB."
            )
        if not f.url:
            raise AttachmentError(f"`{f.name}` has no download link; post it again as a file.")
    if len(parsed) == 1:
        return parsed[0], None
    first, second = parsed
    # The mask is the file named like one; otherwise the second file, as most clients keep order.
    if "mask" in first.name.lower() and "mask" not in second.name.lower():
        return second, first
    return first, second


def origin(url: str) -> str:
    """scheme://host[:port] of `url`, lower case, the default port left out ("" if unparsable)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return ""
    if not parts.scheme or not parts.hostname:
        return ""
    default = {"https": 443, "http": 80}.get(parts.scheme.lower())
    where = parts.hostname.lower() + (f":{port}" if port is not None and port != default else "")
    return f"{parts.scheme.lower()}://{where}"


async def download(
    http: aiohttp.ClientSession, token: str, f: SlackFile, max_bytes: int, allowed_hosts: Sequence[str]
) -> bytes:
    """Fetch a url_private file with the bot token (files:read scope), from Slack's file hosts only
    (`allowed_hosts`, origins): the token is never sent anywhere else (aiohttp drops the
    Authorization header when a redirect leaves the origin)."""
    allowed = {origin(h) for h in allowed_hosts}
    if origin(f.url) not in allowed:
        host = urlsplit(f.url).hostname or "an unknown place"
        raise AttachmentError(
            f"`{f.name}` is not stored in Slack (it links to {host}); upload the image file itself."
        )
    try:
        async with http.get(f.url, headers={"Authorization": f"Bearer {token}"}) as resp:
            if resp.status != 200:
                raise AttachmentError(f"I could not download `{f.name}` (HTTP {resp.status}).")
            if resp.content_type == "text/html":
                # Slack answers a login page instead of the file when the app lacks files:read.
                raise AttachmentError(
                    f"I could not download `{f.name}`: the app needs the files:read scope (ask an admin)."
                )
            data = await resp.content.read(max_bytes + 1)
    except aiohttp.ClientError as e:
        raise AttachmentError(f"I could not download `{f.name}` ({type(e).__name__}).") from e
    if len(data) > max_bytes:
        raise AttachmentError(f"`{f.name}` is larger than the {max_bytes / 1e6:.0f} MB limit.")
    if not data:
        raise AttachmentError(f"`{f.name}` is empty.")
    return data
