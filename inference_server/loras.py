"""The server's LoRAs: the files in `[registry] loras_dir`, what each one fits, and the check of a
request's `loras` list. Never imports aiohttp; torch only through safetensors' header reader.

A LoRA fits a model when it was trained for the same denoiser at the same width: the key prefixes
say which denoiser (a UNet, SD 3's MMDiT or FLUX's transformer, in diffusers' PEFT layout or the
kohya layout most shared LoRAs use), and the input width of a cross-attention key projection says
which text conditioning (768 for SD 1.x, 1024 for SD 2.x, 2048 for SDXL; the transformer's width
for SD 3 and FLUX). Both are read from the file's header and the model's config, so a LoRA is
refused with a 400 naming it before any weights move, and tiny test models are described by the
same code as real ones.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference_server.errors import RequestError

log = logging.getLogger(__name__)

# What diffusers' `save_lora_weights` names the file inside a LoRA folder.
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
# Request weights outside this range are almost always a typo (a LoRA at 5x is noise); negative
# weights are a known technique (steering away from a style), so they are allowed.
MAX_LORA_WEIGHT = 2.0
# A LoRA name is a file name without its suffix; the same rule as model names.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# The key projection of a cross-attention layer: its input width is the text conditioning's.
_CROSS_ATTN_K = re.compile(r"attn2[._]to_k.*(lora_A|lora_down)\.weight$")
_ATTN_K = re.compile(r"attn[._]to_k.*(lora_A|lora_down)\.weight$")


@dataclass(frozen=True)
class LoraTarget:
    """What a LoRA was trained on / what a model offers one: the denoiser and its conditioning width."""

    denoiser: str  # "unet" | "sd3" | "flux"
    width: int | None  # None: the LoRA touches no layer that says (then the denoiser alone decides)

    def describe(self) -> str:
        if self.denoiser == "unet":
            known = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
            label = known.get(self.width or 0, "a UNet")
            return f"{label} ({self.width}-wide text conditioning)" if self.width else "a UNet"
        label = {"sd3": "SD 3.x", "flux": "FLUX.1"}[self.denoiser]
        return f"{label} ({self.width}-wide transformer)" if self.width else label

    def fits(self, model: LoraTarget) -> bool:
        return self.denoiser == model.denoiser and (self.width is None or self.width == model.width)


def model_target(pipe: Any) -> LoraTarget | None:
    """What a loaded text-to-image pipeline offers a LoRA (None: no denoiser we know)."""
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        return target_from_denoiser_config("unet", dict(unet.config))
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None:
        kind = "flux" if type(transformer).__name__.startswith("Flux") else "sd3"
        return target_from_denoiser_config(kind, dict(transformer.config))
    return None


def target_from_denoiser_config(kind: str, config: Mapping[str, Any]) -> LoraTarget:
    if kind == "unet":
        width = config.get("cross_attention_dim")
        return LoraTarget("unet", width if isinstance(width, int) else None)
    heads, head_dim = config.get("num_attention_heads"), config.get("attention_head_dim")
    width = heads * head_dim if isinstance(heads, int) and isinstance(head_dim, int) else None
    return LoraTarget(kind, width)


def folder_target(folder: Path) -> LoraTarget | None:
    """What a diffusers pipeline folder offers a LoRA, read from its denoiser's config.json alone
    (for `/v1/models` before the model is loaded); None when the folder doesn't say."""
    import json

    for sub, kind in (("unet", "unet"), ("transformer", "")):
        path = folder / sub / "config.json"
        if path.is_file():
            try:
                config = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            if not kind:
                kind = "flux" if str(config.get("_class_name", "")).startswith("Flux") else "sd3"
            return target_from_denoiser_config(kind, config)
    return None


def lora_target(shapes: Mapping[str, Sequence[int]]) -> LoraTarget | None:
    """What a LoRA file was trained on, from its tensor names and shapes (None: not a LoRA we know)."""
    keys = list(shapes)
    if any(k.startswith(("unet.", "lora_unet_")) for k in keys):
        denoiser, pattern = "unet", _CROSS_ATTN_K
    elif any(k.startswith(("transformer.", "lora_transformer_")) for k in keys):
        flux = any("single_transformer_blocks" in k or "single_blocks" in k for k in keys)
        denoiser, pattern = ("flux" if flux else "sd3"), _ATTN_K
    else:
        return None
    widths = {int(shape[1]) for key, shape in shapes.items() if pattern.search(key) and len(shape) >= 2}
    return LoraTarget(denoiser, widths.pop() if len(widths) == 1 else None)


@dataclass(frozen=True)
class Lora:
    name: str
    path: Path  # the .safetensors file
    target: LoraTarget


def _read_shapes(path: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 (not a dict)


class LoraLibrary:
    """The LoRAs of `[registry] loras_dir`, read from the folder on start and re-read when a request
    names one it doesn't know (a LoRA dropped in while the server runs is found without a restart)."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder).expanduser() if folder else None
        self._loras: dict[str, Lora] = {}
        self._scanned_at: float | None = None
        self.refresh()

    def refresh(self) -> None:
        if self.folder is None:
            return
        try:
            mtime = self.folder.stat().st_mtime
        except OSError:
            log.warning("[registry] loras_dir %s does not exist; no LoRAs", self.folder)
            self._loras = {}
            return
        if mtime == self._scanned_at:
            return  # nothing was added or removed since the last scan
        found: dict[str, Lora] = {}
        for entry in sorted(self.folder.iterdir()):
            if entry.is_dir():
                name, file = entry.name, entry / LORA_WEIGHTS_NAME
            elif entry.suffix == ".safetensors":
                name, file = entry.stem, entry
            else:
                continue
            if not file.is_file() or not _NAME.match(name):
                continue
            known = self._loras.get(name)
            if known is not None and known.path == file:
                found[name] = known
                continue
            try:
                target = lora_target(_read_shapes(file))
            except Exception as e:  # a truncated or foreign file: skip it, say so
                log.warning("LoRA %s: cannot read %s (%s); skipped", name, file, e)
                continue
            if target is None:
                log.warning("LoRA %s: %s holds no UNet or transformer LoRA weights; skipped", name, file)
                continue
            found[name] = Lora(name, file, target)
        self._loras = found
        self._scanned_at = mtime
        log.info("LoRAs in %s: %s", self.folder, ", ".join(found) or "none")

    def get(self, name: str) -> Lora | None:
        lora = self._loras.get(name)
        if lora is None:
            self.refresh()
            lora = self._loras.get(name)
        return lora

    def names_for(self, target: LoraTarget | None) -> list[str]:
        """The LoRAs that fit a model (none when what the model offers is unknown)."""
        if target is None:
            return []
        return [name for name, lora in self._loras.items() if lora.target.fits(target)]

    def check(
        self, value: Any, *, model: str, target: LoraTarget | None, limit: int, from_form: bool = False
    ) -> tuple[tuple[str, float], ...]:
        """A request's `loras` as ((name, weight), ...) sorted by name, or a 400 naming the entry.

        Sorted: the same set in another order is the same computation, so it batches together."""
        if value is None:
            return ()
        if from_form and isinstance(value, str):
            import json

            try:
                value = json.loads(value)
            except ValueError:
                raise _invalid("loras", "loras must be a JSON list of {name, weight} objects") from None
        if not isinstance(value, list):
            raise _invalid("loras", 'loras must be a list of {"name": str, "weight": number} objects')
        if len(value) > limit:
            raise _invalid("loras", f"at most {limit} LoRAs per request ([registry] max_loras_per_request)")
        chosen: dict[str, float] = {}
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise _invalid(
                    f"loras[{i}]", f'loras[{i}] must be an object {{"name": str, "weight": number}}'
                )
            extra = sorted(set(item) - {"name", "weight"})
            if extra:
                raise _invalid(f"loras[{i}].{extra[0]}", f"loras[{i}] has an unknown field {extra[0]!r}")
            name = item.get("name")
            if not isinstance(name, str) or not name:
                raise _invalid(f"loras[{i}].name", f"loras[{i}].name must be a LoRA's name (a string)")
            weight = item.get("weight", 1.0)
            if (
                isinstance(weight, bool)
                or not isinstance(weight, int | float)
                or not math.isfinite(weight)
                or not -MAX_LORA_WEIGHT <= weight <= MAX_LORA_WEIGHT
            ):
                raise _invalid(
                    f"loras[{i}].weight",
                    f"loras[{i}].weight must be a number from {-MAX_LORA_WEIGHT:g} to {MAX_LORA_WEIGHT:g}, "
                    f"got {weight!r}"[:200],
                )
            lora = self.get(name)
            if lora is None:
                known = ", ".join(self.names_for(target)) or "none"
                raise RequestError(
                    400,
                    "unknown_lora",
                    f"loras[{i}].name",
                    f"no LoRA named {name[:64]!r}; LoRAs for model {model!r}: {known}",
                )
            if target is None or not lora.target.fits(target):
                offered = target.describe() if target is not None else "a model LoRAs can't be applied to"
                raise _invalid(
                    f"loras[{i}].name",
                    f"LoRA {name!r} was trained for {lora.target.describe()}; model {model!r} is {offered}",
                )
            if name in chosen:
                raise _invalid(f"loras[{i}].name", f"LoRA {name!r} is listed twice")
            chosen[name] = float(weight)
        return tuple(sorted(chosen.items()))


def _invalid(field: str, message: str) -> RequestError:
    return RequestError(400, "invalid_lora", field, message)
