"""Plain-text summaries of a job that every adapter shows the same way (platform markup is theirs)."""

from __future__ import annotations

from bot.core.api import JobView

_KIND_LABEL = {
    "imagine": "",
    "inpaint": "inpaint",
    "variation": "variation",
    "reroll": "re-roll",
    "upscale": "upscale",
    "zoom": "zoom out",
    "pan": "pan",
    "remix": "remix",
}


def kind_label(job: JobView) -> str:
    """What made the job, in words: "zoom out 2x", "variation (subtle)", "image to image", ""."""
    label = _KIND_LABEL.get(job.kind, job.kind)
    detail = job.params.detail
    if job.kind == "imagine" and job.params.task == "img2img":
        return "image to image"
    if detail and job.kind in ("zoom", "pan"):
        return f"{label} {detail}"
    if detail and job.kind == "variation":
        return f"{label} ({detail})"
    return label


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
    if p.strength is not None and p.task != "txt2img":
        parts.append(f"strength {p.strength:g}")
    if p.model:
        parts.append(f"model {p.model}")
    if p.loras:
        parts.append("lora " + ", ".join(f"{lora.name}:{lora.weight:g}" for lora in p.loras))
    label = kind_label(job)
    return (f"{label} · " if label else "") + " · ".join(parts)
