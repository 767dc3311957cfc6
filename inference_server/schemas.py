"""The request schemas of both HTTP APIs, as pydantic models built for one server configuration.

The configured limits (`[inference_server] max_steps`, `max_side`, ...) and the fixed ones
(`limits.py`) are part of the models, so a request is checked against exactly what the OpenAPI
document (`openapi.py`, generated from these models) shows. `validate` runs a model over a body and
turns the first problem into a `RequestError` naming the field, in words taken from the model's own
JSON schema (its bounds, its choices). Nothing is silently "fixed": a wrong type, a width that is not
a multiple of 8 or an unknown field is an error, not a guess; `null` means "not given".

JSON bodies are validated strictly (a number must be a JSON number); multipart form fields are text,
so there numbers and booleans are read from their text (`from_form`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

from inference_server.engine import Task
from inference_server.errors import RequestError
from inference_server.families import DDPM_SAMPLERS, DEFAULT_TRUE_CFG, SIZE_FLOOR, ModelFamily
from inference_server.limits import MAX_GUIDANCE, PRIORITY_LIMIT, SEED_LIMIT
from inference_server.loras import MAX_LORA_WEIGHT
from inference_server.step_cache import CACHE_LEVELS

if TYPE_CHECKING:
    from inference_server.config import ServerConfig

__all__ = [
    "RequestModels",
    "request_models",
    "validate",
    "show",
    "parse_size",
    "SHOWN_CHARS",
    "OUTPUT_FORMATS",
]

# Values echoed in error messages are cut to this many characters: a client that sends a megabyte
# in a numeric field needn't get it back, and the log line stays readable.
SHOWN_CHARS = 40
# OpenAI's own bounds for its integer fields: JPEG/WebP quality, and partial previews per image.
MAX_OUTPUT_COMPRESSION = 100
MAX_PARTIAL_IMAGES = 3
# output_format -> (PIL format, Content-Type, file extension)
OUTPUT_FORMATS = {
    "png": ("PNG", "image/png", "png"),
    "jpeg": ("JPEG", "image/jpeg", "jpg"),
    "jpg": ("JPEG", "image/jpeg", "jpg"),
    "webp": ("WEBP", "image/webp", "webp"),
}
_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")


def show(value: Any) -> str:
    """`repr(value)` for an error message, shortened past SHOWN_CHARS (ints by digit count)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**SHOWN_CHARS:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} characters)"


def _text_problem(value: str) -> str | None:
    """Where `value` holds a lone UTF-16 surrogate, or None.

    A JSON body can carry one ("\\ud800"): a Python str holds it, but it is no character, the
    tokenizer can't encode it, and in a batched call it would fail everyone else's request too.
    pydantic refuses such a string (`string_unicode`); this says where it is, for the message."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return (
            f"holds a lone UTF-16 surrogate ({value[e.start]!r} at character {e.start}), "
            "which is not text; send valid Unicode"
        )
    return None


def side_bounds(server: ServerConfig, family: ModelFamily | None) -> tuple[int, int, int]:
    """(multiple, smallest, largest) side a request may ask for: the server's `min_side`..`max_side`
    narrowed to multiples of the model's size multiple (8 before the model is loaded)."""
    multiple = family.size_multiple if family is not None else SIZE_FLOOR
    lo = -(-server.min_side // multiple) * multiple
    hi = server.max_side // multiple * multiple
    return multiple, lo, max(hi, lo)


def _model_words(family: ModelFamily | None) -> str:
    return "" if family is None else f" for {family.label}"


def size_problem(value: str, server: ServerConfig, family: ModelFamily | None = None) -> str | None:
    """Why an OpenAI `size` ("WIDTHxHEIGHT" or "auto") can't be served, or None."""
    if value.strip().lower() == "auto":
        return None
    match = _SIZE.match(value)
    if match is None:
        return f"must be 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto', got {show(value)}"
    width, height = int(match[1]), int(match[2])
    m, lo, hi = side_bounds(server, family)
    if not (lo <= width <= hi and lo <= height <= hi and width % m == 0 and height % m == 0):
        return (
            f"{width}x{height} is not supported{_model_words(family)}: width and height must be "
            f"multiples of {m} from {lo} to {hi}"
        )
    return None


def parse_size(value: Any, server: ServerConfig, family: ModelFamily | None = None) -> tuple[int, int] | None:
    """`"WxH"` -> (W, H); `"auto"` -> None (the model's default, or the uploaded image's size)."""
    if not isinstance(value, str):
        raise RequestError(
            400,
            "invalid_request",
            "size",
            f"size must be a string like '512x512' or 'auto', got {show(value)}",
        )
    problem = size_problem(value, server, family)
    if problem is not None:
        raise RequestError(400, "invalid_request", "size", f"size {problem}")
    match = _SIZE.match(value)
    return None if match is None else (int(match[1]), int(match[2]))


# -- field types -----------------------------------------------------------------------------------


def _problem(text: str) -> PydanticCustomError:
    """A check of ours failed: `text` follows the field's name in the message."""
    return PydanticCustomError("field_problem", "{problem}", {"problem": text})


def _refusal(message: str) -> PydanticCustomError:
    """A check of ours failed: `message` is the whole message (it names the field itself)."""
    return PydanticCustomError("field_refused", "{message}", {"message": message})


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


@dataclass(frozen=True)
class OneOf:
    """`Annotated[str, OneOf(names)]`: one of `names`, case-insensitive, documented as an enum.
    `what` says whose choices they are in the error message ("the samplers for FLUX.1-dev")."""

    names: tuple[str, ...]
    what: str = ""

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        checked = core_schema.no_info_after_validator_function(self._check, handler(source))
        return core_schema.no_info_before_validator_function(_lower, checked)

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "enum": list(self.names)}

    def _check(self, value: str) -> str:
        if value not in self.names:
            whose = f" ({self.what})" if self.what else ""
            raise _problem(f"must be one of {', '.join(self.names)}{whose}, got {show(value)}")
        return value


def _upload(value: Any) -> str | bytes:
    if isinstance(value, str | bytes):
        return value
    raise _problem(f"must be an image: a file part, or base64 text in JSON, got {_describe(value)}")


def _form_list(value: Any, info: ValidationInfo) -> Any:
    # A form field holds text: "1,2" or "[1, 2]" is the list.
    if isinstance(value, str) and info.context and info.context.get("from_form"):
        return [item for item in value.replace(" ", "").strip("[]").split(",") if item]
    return value


def _no_transparency(value: Any) -> Any:
    if _lower(value) == "transparent":
        raise _refusal("transparent backgrounds are not supported by this server (use auto or opaque)")
    return value


Number = Annotated[float, Field(allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=SEED_LIMIT - 1)]
ResponseFormat = Annotated[str, OneOf(("url", "b64_json"))]
OutputFormat = Annotated[str, OneOf(tuple(OUTPUT_FORMATS))]
Background = Annotated[str, BeforeValidator(_no_transparency), OneOf(("auto", "opaque"))]
Upload = Annotated[
    str | bytes,
    PlainValidator(_upload),
    WithJsonSchema(
        {
            "type": "string",
            "contentEncoding": "base64",
            "description": "PNG, JPEG or WebP; a file part in forms",
        }
    ),
]


def _form_json(value: Any, info: ValidationInfo) -> Any:
    # A form field holds text: `loras` comes as JSON there.
    if isinstance(value, str) and info.context and info.context.get("from_form"):
        import json

        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


class LoraRef(BaseModel):
    """One LoRA of a request: a name from GET /v1/models (`loras`), and its weight."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, description="a LoRA in [registry] loras_dir that fits the model")
    weight: Number = Field(
        1.0,
        ge=-MAX_LORA_WEIGHT,
        le=MAX_LORA_WEIGHT,
        description="0 = off, 1 = as trained; negative steers away",
    )


# Accepted for compatibility and ignored (see the OpenAI models' descriptions).
Ignored = Annotated[Any, Field(description="accepted and ignored")]

_CONFIG = ConfigDict(extra="forbid", str_strip_whitespace=True)


@dataclass(frozen=True)
class RequestModels:
    """The request models of one server configuration, by native task and by OpenAI endpoint."""

    native: Mapping[Task, type[BaseModel]]
    openai: Mapping[str, type[BaseModel]]  # "generations" | "edits" | "variations"


@functools.cache
def request_models(server: ServerConfig, family: ModelFamily | None = None) -> RequestModels:
    """The models for `server`'s limits and the loaded model's family (built once per pair).

    Without a family (the model is still loading) sizes are multiples of 8 and the samplers those
    of the UNet models; requests are refused as not ready then anyway, but /openapi.yaml answers.
    """
    chars = server.max_prompt_chars
    images = server.max_images_per_request
    multiple, min_side, max_side = side_bounds(server, family)
    samplers = family.samplers if family is not None else tuple(DDPM_SAMPLERS)
    flow = family is not None and family.flow_matching
    Scheduler = Annotated[
        str,
        OneOf(
            samplers,
            what=""
            if family is None
            else f"the samplers for {family.label}{', a flow-matching model' if flow else ''}",
        ),
    ]
    words = _model_words(family)
    CacheName = Annotated[str, OneOf(CACHE_LEVELS, what="the step-caching levels")]
    takes_true_cfg = family is not None and family.negative_prompt == "true_cfg"
    guidance_words = {
        None: "classifier-free guidance; default [model] guidance",
        "cfg": "classifier-free guidance (> 1 to use the negative prompt); default [model] guidance, else the model's",
        "distilled": "distilled guidance, embedded into the model (one pass per step); default [model] guidance, "
        "else the model's",
        "none": "this model takes no guidance: leave it out or send 0",
    }[family.guidance if family is not None else None]

    def prompt_field(required: bool = True) -> Any:
        if required:
            return Field(
                min_length=1, max_length=chars, description="limit: [inference_server] max_prompt_chars"
            )
        return Field("", max_length=chars, description="limit: [inference_server] max_prompt_chars")

    def side_field(name: str) -> Any:
        return Field(
            None,
            ge=min_side,
            le=max_side,
            multiple_of=multiple,
            description=f"default: [model] {name} (else the model's native size), or the uploaded image's; "
            f"[inference_server] min_side..max_side, in multiples of the model's size multiple{words}",
        )

    def strength_field() -> Any:
        return Field(
            None, gt=0, le=1, description="how much of the image is repainted; default [model] strength"
        )

    # Bases first: a model's fields are listed (and checked) base by base, prompt first.
    class Prompted(BaseModel):
        model_config = _CONFIG
        prompt: str = prompt_field()

    # The generation options shared by the native routes and, as extensions, the OpenAI ones.
    class Extensions(BaseModel):
        model_config = _CONFIG
        negative_prompt: str | None = Field(None, max_length=chars, description="what to steer away from")
        seed: Seed | None = Field(None, description="image i uses (seed + i) mod 2^32; random if absent")
        steps: int | None = Field(
            None,
            ge=1,
            le=server.max_steps,
            description="default: [model] steps; [inference_server] max_steps",
        )
        guidance: Number | None = Field(None, ge=0, le=MAX_GUIDANCE, description=guidance_words)
        scheduler: Scheduler | None = Field(None, description="default: [model] scheduler")
        if takes_true_cfg:
            true_cfg: Number | None = Field(
                None,
                ge=1,
                le=MAX_GUIDANCE,
                description=f"true classifier-free guidance, which a negative prompt acts through{words} "
                f"(a second transformer pass per step; 1 = off); default {DEFAULT_TRUE_CFG:g} with a "
                "negative prompt, off without",
            )
        cache: CacheName | None = Field(
            None,
            description="step caching: off, fast or faster (reuse work across denoising steps; faster is "
            "cheaper, further from the uncached image); default [model] cache",
        )
        timeout_s: Number | None = Field(
            None,
            gt=0,
            le=server.max_timeout_s,
            description="deadline; default [inference_server] default_timeout_s, at most max_timeout_s",
        )
        priority: int | None = Field(
            None,
            ge=-PRIORITY_LIMIT,
            le=PRIORITY_LIMIT,
            description="lower joins the running batch first (continuous engine; the dynamic engine is FIFO)",
        )
        loras: Annotated[list[LoraRef], BeforeValidator(_form_json)] | None = Field(
            None,
            description="LoRAs to apply, each with its weight (-2..2): names from GET /v1/models; at most "
            "[registry] max_loras_per_request",
        )

    class Count(BaseModel):
        model_config = _CONFIG
        n: int | None = Field(
            None, ge=1, le=images, description="number of images; [inference_server] max_images_per_request"
        )

    class Txt2ImgRequest(Count, Extensions, Prompted):
        """Unknown fields are refused (400 naming them); null means "not given"."""

        model: str | None = Field(
            None, description="a model's name from GET /v1/models; default: the server's default model"
        )
        width: int | None = side_field("width")
        height: int | None = side_field("height")
        seeds: Annotated[list[Seed], BeforeValidator(_form_list)] | None = Field(
            None, description="explicit per-image seeds (as many as n); not with seed"
        )
        stream: bool | None = Field(
            None,
            description="NDJSON progress events, then the result (also via Accept: application/x-ndjson)",
        )

    class Img2ImgRequest(Txt2ImgRequest):
        """The txt2img fields, an image and a strength. In a form, `image` is a file part."""

        image: Upload = Field(description="sets width/height unless they are given (then it is resized)")
        strength: Number | None = strength_field()

    class InpaintRequest(Img2ImgRequest):
        """The img2img fields and a mask. In a form, `image` and `mask` are file parts."""

        mask: Upload = Field(description="same size as image; white = repaint, black = keep")

    def _size(value: str) -> str:
        problem = size_problem(value, server, family)
        if problem is not None:
            raise _problem(problem)
        return value

    class OpenAIOptions(Count, Extensions):
        model: str | None = Field(
            None,
            description="a model's name from GET /v1/models; OpenAI's names (dall-e-2, dall-e-3, gpt-image-*) "
            "and no model mean the server's default model",
        )
        size: Annotated[str, AfterValidator(_size)] | None = Field(
            None,
            description=f"WIDTHxHEIGHT (multiples of {multiple}, {min_side}..{max_side}) or auto "
            "(= [model] width/height, else the model's native size)",
        )
        response_format: ResponseFormat | None = Field(
            None, description="default b64_json (url for model dall-e-2 / dall-e-3)"
        )
        output_format: OutputFormat | None = Field(None, description="default png")
        output_compression: int | None = Field(
            None, ge=0, le=MAX_OUTPUT_COMPRESSION, description="JPEG/WebP quality, default 100"
        )
        background: Background | None = Field(None, description="transparent is refused")
        stream: bool | None = Field(
            None,
            description="text/event-stream: up to partial_images *.partial_image previews per image, then "
            "one *.completed event per image; "
            "SSE comments report progress; later errors as an error event",
        )
        partial_images: int | None = Field(
            None,
            ge=0,
            le=MAX_PARTIAL_IMAGES,
            description="with stream: previews per image (PNG, longest side 256) sent as *.partial_image "
            "events, evenly spaced over the steps; fewer when there are too few steps; default 0",
        )
        quality: Ignored = None
        complexity: Ignored = None
        user: Annotated[Any, Field(description="only goes to the debug log")] = None
        safety_identifier: Annotated[Any, Field(description="only goes to the debug log")] = None

    class OpenAIGenerationsRequest(OpenAIOptions, Prompted):
        """Unknown fields are refused (400, `param` names them). Extensions: negative_prompt, seed,
        steps, guidance, scheduler, timeout_s, priority, cache (as on /v1/txt2img)."""

        style: Ignored = None
        moderation: Ignored = None
        frame_count: Ignored = None
        frame_duration_ms: Ignored = None
        svg: Ignored = None

    class OpenAIEditsRequest(OpenAIOptions, Prompted):
        """Unknown fields are refused (400, `param` names them); so is `markup` (use mask).
        Extensions: strength and the native generation fields."""

        image: Upload | None = Field(None, description="required (as image or image[]; one image)")
        image_list: Upload | None = Field(None, alias="image[]", description="the same as image")
        mask: Upload | None = Field(None, description="PNG with alpha, same size as image; alpha 0 = edit")
        strength: Number | None = strength_field()
        input_fidelity: Ignored = None

    class OpenAIVariationsRequest(OpenAIOptions):
        """Unknown fields are refused (400, `param` names them). Extensions: prompt (steers the
        variation; default empty), strength and the native generation fields. No streaming."""

        image: Upload = Field(description="the image to vary")
        prompt: str = prompt_field(required=False)
        strength: Number | None = strength_field()

    return RequestModels(
        native={"txt2img": Txt2ImgRequest, "img2img": Img2ImgRequest, "inpaint": InpaintRequest},
        openai={
            "generations": OpenAIGenerationsRequest,
            "edits": OpenAIEditsRequest,
            "variations": OpenAIVariationsRequest,
        },
    )


# -- validation and its messages -------------------------------------------------------------------


def validate(
    model: type[BaseModel],
    data: Mapping[str, Any],
    *,
    from_form: bool,
    unknown: Callable[[str], str],
) -> dict[str, Any]:
    """`data` checked against `model`: the fields by name (aliases included), absent ones None.

    The first problem becomes a 400 `RequestError` naming its field; `unknown(name)` words the
    message for a field the model doesn't have (an unknown field is reported before anything else).
    """
    try:
        checked = model.model_validate(data, strict=not from_form, context={"from_form": from_form})
    except ValidationError as e:
        errors = e.errors(include_url=False)
        extra = [error for error in errors if error["type"] == "extra_forbidden"]
        if extra:
            name = str(extra[0]["loc"][0])
            raise RequestError(400, "invalid_request", name, unknown(name)) from None
        field, message = describe(model, errors[0], from_form)
        raise RequestError(400, "invalid_request", field, message) from None
    return checked.model_dump(by_alias=True)


def describe(model: type[BaseModel], error: Mapping[str, Any], from_form: bool) -> tuple[str, str]:
    """(field, message) for one pydantic error, e.g. ("steps", "steps must be between 1 and 150, got 0")."""
    loc = error["loc"]
    field = str(loc[0])
    where = field + "".join(f"[{part}]" for part in loc[1:])
    kind, value, ctx = error["type"], error["input"], error.get("ctx") or {}
    if kind == "missing" or (value is None and len(loc) == 1):
        return field, f"{field} is required"
    if kind == "field_problem":
        return field, f"{where} {ctx['problem']}"
    if kind == "field_refused":
        return field, str(ctx["message"])
    if kind == "string_unicode" and isinstance(value, str):  # pydantic's own check for surrogates
        return field, f"{where} {_text_problem(value)}"
    if kind.startswith("int_"):
        return field, f"{where} must be an integer, got {_describe(value, from_form)}"
    if kind == "float_type" and isinstance(value, int) and not isinstance(value, bool):
        return field, f"{where} must be a finite number, got an integer of {len(str(abs(value)))} digits"
    if kind in ("float_type", "float_parsing"):
        return field, f"{where} must be a number, got {_describe(value, from_form)}"
    if kind == "finite_number":
        return field, f"{where} must be a finite number"
    if kind.startswith("bool_"):
        return field, f"{where} must be true or false, got {_describe(value, from_form)}"
    if kind.startswith("string_") and kind not in ("string_too_short", "string_too_long"):
        return field, f"{where} must be a string, got {_describe(value, from_form)}"
    if kind == "string_too_short":
        return field, f"{where} must not be empty"
    if kind == "string_too_long":
        return field, f"{where} is {len(value)} characters; the limit is {ctx['max_length']}"
    if kind == "list_type":
        return field, f"{where} must be a list of integers, got {_describe(value, from_form)}"
    if kind == "multiple_of":
        return (
            field,
            f"{where} must be a multiple of {ctx['multiple_of']} (the model's size multiple), got {show(value)}",
        )
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return field, f"{where} must be {_range(_schema_at(model, loc))}, got {show(value)}"
    return field, f"{where}: {error['msg']}"


def _describe(value: Any, from_form: bool = False) -> str:
    if isinstance(value, str):
        return show(value) if from_form else f"a string ({show(value)})"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return show(value)
    names = {dict: "an object", list: "a list", bytes: "a file", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _range(schema: Mapping[str, Any]) -> str:
    """A field's bounds in words, from its JSON schema."""
    lo, hi = schema.get("minimum"), schema.get("maximum")
    if lo is not None and hi is not None:
        return f"between {lo:g} and {hi:g}"
    parts = []
    if "exclusiveMinimum" in schema:
        parts.append(f"> {schema['exclusiveMinimum']:g}")
    elif lo is not None:
        parts.append(f">= {lo:g}")
    if "exclusiveMaximum" in schema:
        parts.append(f"< {schema['exclusiveMaximum']:g}")
    elif hi is not None:
        parts.append(f"<= {hi:g}")
    return " and ".join(parts) or "in range"


@functools.cache
def _json_schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema(by_alias=True)


def _schema_at(model: type[BaseModel], loc: Sequence[Any]) -> Mapping[str, Any]:
    """The JSON schema of the value at `loc` (a field, or an item of a list field)."""
    node: Mapping[str, Any] = _json_schema(model)["properties"][loc[0]]
    for part in [*loc[1:], None]:
        options = [s for s in node.get("anyOf", [node]) if s.get("type") != "null"]
        node = options[0] if options else node
        if part is not None:
            node = node.get("items", node)
    return node
