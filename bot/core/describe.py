"""Plain-text summaries of a job that every adapter shows the same way (platform markup is theirs)."""

from __future__ import annotations

from bot.core.api import JobView, ModelListing
from bot.core.params import MAX_LORA_WEIGHT, MAX_LORAS, MIN_LORA_WEIGHT

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


NO_MODEL_CHOICE = "The inference server offers one model and no LoRAs: there is nothing to choose."
MODEL_USAGE = (
    f"Pick one with --model NAME; add up to {MAX_LORAS} LoRAs with --lora NAME:WEIGHT "
    f"(weight {MIN_LORA_WEIGHT:g} to {MAX_LORA_WEIGHT:g}, 1 when left out)."
)


def model_lines(listing: ModelListing) -> list[str]:
    """One line per model: "sdxl-base — SDXL, default here; LoRAs: detail, pixel-art". Adapters add
    their markup around the name (the text up to the first " — ")."""
    lines = []
    for m in listing.models:
        notes = [m.label]
        if m.default:
            notes.append("default here")
        if not m.loaded:
            notes.append("loads on first use")
        loras = ", ".join(m.loras) if m.loras else "none"
        lines.append(f"{m.name} — {', '.join(notes)}; LoRAs: {loras}")
    return lines


def models_summary(listing: ModelListing) -> str:
    """The models in a sentence, for /help: "sdxl-base (default), sd15-base. Pick one with ..."."""
    if not listing.choice:
        return NO_MODEL_CHOICE
    names = [f"{m.name} (default)" if m.default else m.name for m in listing.models]
    return f"{', '.join(names) or 'none allowed here'}. {MODEL_USAGE}"
