"""The OpenAPI document served at GET /openapi.yaml, generated for one server configuration.

`openapi.yaml` holds what the code can't say (summaries, responses, security); every POST route's
requestBody and its schema are generated here from the request models in `schemas.py`, with the
server's own limits, so the document and the validation can't disagree.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel

from inference_server.engine import TASKS
from inference_server.schemas import RequestModels, request_models

if TYPE_CHECKING:
    from inference_server.config import ServerConfig
    from inference_server.families import ModelFamily

TEMPLATE = Path(__file__).resolve().parent / "openapi.yaml"
JSON = "application/json"
FORM = "multipart/form-data"
IMAGE_TYPES = "image/png, image/jpeg, image/webp"


RequestBodies = dict[str, tuple[type[BaseModel], tuple[str, ...]]]


def request_bodies(models: RequestModels) -> RequestBodies:
    """POST path -> (the model its handler validates with, the media types it reads).

    Every body route reads JSON and multipart alike (`bodies.read_body`); multipart is where the
    OpenAI edits and variations expect their uploads.
    """
    native: RequestBodies = {f"/v1/{task}": (models.native[task], (JSON, FORM)) for task in TASKS}
    openai: RequestBodies = {
        "/v1/images/generations": (models.openai["generations"], (JSON, FORM)),
        "/v1/images/edits": (models.openai["edits"], (FORM, JSON)),
        "/v1/images/variations": (models.openai["variations"], (FORM, JSON)),
    }
    return native | openai


@functools.cache
def openapi_document(server: ServerConfig, family: ModelFamily | None = None) -> str:
    """The document as YAML (built once per configuration and model family; before the model is
    loaded, with the limits that don't depend on it)."""
    doc = yaml.safe_load(TEMPLATE.read_text(encoding="utf-8"))
    schemas = doc["components"]["schemas"]
    for path, (model, media_types) in request_bodies(request_models(server, family)).items():
        name = model.__name__
        schemas[name] = model_schema(model)
        # Nested models (LoraRef) are shared components, which the $refs already point at.
        for nested, schema in schemas[name].pop("$defs", {}).items():
            for prop in schema.get("properties", {}).values():
                prop.pop("title", None)
            schemas[nested] = schema
        content: dict[str, Any] = {}
        for media_type in media_types:
            content[media_type] = {"schema": {"$ref": f"#/components/schemas/{name}"}}
            if media_type == FORM:
                uploads = [field for field, prop in schemas[name]["properties"].items() if _is_upload(prop)]
                content[media_type]["encoding"] = {field: {"contentType": IMAGE_TYPES} for field in uploads}
        doc["paths"][path]["post"]["requestBody"] = {"required": True, "content": content}
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=100)


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON schema as an OpenAPI 3.1 component (field titles dropped: names say it)."""
    schema = model.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
    for prop in schema.get("properties", {}).values():
        prop.pop("title", None)
    return schema


def _is_upload(prop: Mapping[str, Any]) -> bool:
    return any("contentEncoding" in option for option in prop.get("anyOf", [prop]))
