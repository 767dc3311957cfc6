"""Live previews on Discord: the status message is edited with the preview attached, then the result."""

from __future__ import annotations

from bot.backends.fake import FakeBackend
from bot.discord_adapter.delivery import PREVIEW_FILENAME
from tests.discord.fake_discord import FakeDiscord
from tests.discord.harness import App, app_config, image_size


async def test_status_edits_carry_the_preview_then_the_result_arrives_once(
    fake_discord: FakeDiscord, tmp_path
):
    user = fake_discord.user("watcher")
    backend = FakeBackend(delay_s=0.3, preview_every=2)  # previews after steps 2 and 4 of 6
    config = app_config(tmp_path, fake_discord, bot={"preview_interval_s": 0.001})
    async with App(fake_discord, config, backend=backend):
        rec = await fake_discord.slash("imagine", user, {"prompt": "a forming cloud", "steps": 6})

        def result() -> dict | None:
            shown = rec.original
            if shown and shown["attachments"] and shown["attachments"][0]["filename"] != PREVIEW_FILENAME:
                return shown
            return None

        final = await fake_discord.wait_for(result, within=60, what="the result")
    previews = [
        e for e in rec.edits if any(a.get("filename") == PREVIEW_FILENAME for a in e.get("attachments", []))
    ]
    assert previews, "no status edit carried a preview"
    for edit in previews:
        assert len(edit["_files"]) == 1 and image_size(edit["_files"][0]) == (16, 16)
        assert edit["content"]  # the progress line stays beside the picture
    # The result replaced the preview (one attachment, the image) and was posted once.
    assert len(final["attachments"]) == 1 and final["_files"]
    results = [
        e
        for e in rec.edits + rec.followups
        if e.get("_files")
        and not any(a.get("filename") == PREVIEW_FILENAME for a in e.get("attachments", []))
    ]
    assert len(results) == 1
    assert max(p["_seq"] for p in previews) < results[0]["_seq"]
