"""Plain-text summaries of a job that every adapter shows the same way (platform markup is theirs)."""

from __future__ import annotations

from bot.core.api import JobView

_KIND_PREFIX = {"imagine": "", "inpaint": "inpaint · ", "variation": "variation · ", "reroll": "re-roll · "}


def short(text: str, limit: int) -> str:
    """`text` cut to `limit` characters with an ellipsis, so long prompts can't push out the rest."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe(job: JobView) -> str:
    """The job's kind and parameters: "variation · seed 7 · 64x64 · 20 steps · guidance 7.5 · ..."."""
    p = job.params
    parts = [f"seed {p.seed}", f"{p.width}x{p.height}", f"{p.steps} steps", f"guidance {p.guidance:g}"]
    if p.aspect_ratio:
        parts.append(f"ar {p.aspect_ratio}")
    if p.n > 1:
        parts.append(f"{p.n} images")
    if p.strength is not None and job.kind != "imagine":
        parts.append(f"strength {p.strength:g}")
    return _KIND_PREFIX.get(job.kind, "") + " · ".join(parts)
