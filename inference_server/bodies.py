"""Reading request bodies (JSON or multipart) within size, depth, duplicate and time limits.

Every route that takes a body (the native `/v1/<task>` routes and the OpenAI-compatible ones) reads
it through `read_body`, so a malformed, oversized, over-nested or never-finishing body gets the same
4xx on every route, raised as a `RequestError` naming what was wrong.
"""

from __future__ import annotations

import asyncio
import json
import sys
from itertools import accumulate
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from inference_server import keys
from inference_server.errors import RequestError

__all__ = ["read_body", "loads_limited", "json_shape_problem", "MAX_JSON_DEPTH", "MAX_JSON_CONTAINERS"]

# The request schemas nest two levels (an object holding a list of seeds). 32 leaves room for any
# extension while staying far below the depth at which Python's JSON decoder, which recurses once
# per level, runs out of stack (RecursionError).
MAX_JSON_DEPTH = 32
# A valid body holds one object and perhaps a list of seeds. Past this many arrays and objects a
# body is refused unparsed: building millions of them is the parser's slowest case (seconds of CPU
# for 16 MiB of "[],", against tens of milliseconds for a 16 MiB base64 image).
MAX_JSON_CONTAINERS = 1024
# Bodies larger than this are checked and parsed on a worker thread: a 16 MiB body takes tens of
# milliseconds, which would stall every other connection if done on the event loop.
INLINE_PARSE_BYTES = 256 * 1024

_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"\\')
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1


def json_shape_problem(raw: bytes) -> str | None:
    """Why `raw` is refused before parsing (nesting deeper than MAX_JSON_DEPTH, more than
    MAX_JSON_CONTAINERS arrays and objects), or None. Linear, and only C-level loops over the body.

    Brackets inside strings don't count. Invalid JSON gets some answer; the parser then rejects it.
    """
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return None  # the common case (a handful of brackets, none in base64 images): nothing to scan
    # Keep only what matters (brackets, quotes, backslashes), then drop the strings' contents:
    # escaped backslashes first, so that a remaining \" is an escaped quote; then every other piece
    # between quotes is outside the strings.
    unescaped = raw.translate(None, _NOT_STRUCTURE).replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = b"".join(unescaped.split(b'"')[::2]).translate(None, _NOT_BRACKETS)
    containers = brackets.count(b"[") + brackets.count(b"{")
    if containers > MAX_JSON_CONTAINERS:
        return f"the JSON body holds more than {MAX_JSON_CONTAINERS} arrays and objects"
    if len(brackets) > 2 * containers:
        return "the body is not valid JSON: it closes more brackets than it opens"
    # At most 2 x MAX_JSON_CONTAINERS brackets are left: the running depth is cheap to follow.
    if containers > MAX_JSON_DEPTH and max(accumulate(map(_STEP.__getitem__, brackets))) > MAX_JSON_DEPTH:
        return f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels"
    return None


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def loads_limited(raw: bytes) -> Any:
    """`json.loads` for untrusted bodies: depth checked first, duplicate keys refused, and every
    failure (bad syntax, bad UTF-8, integers past Python's digit limit) a 400 `RequestError`."""
    problem = json_shape_problem(raw)
    if problem is not None:
        raise RequestError(400, "invalid_request", None, problem)
    try:
        return json.loads(raw, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        # Last-wins would silently drop one of the client's values.
        raise RequestError(
            400, "invalid_request", e.key, f"{e.key} appears more than once in the JSON body"
        ) from None
    except json.JSONDecodeError as e:
        raise RequestError(400, "invalid_request", None, f"the body is not valid JSON: {e}") from None
    except UnicodeDecodeError:
        raise RequestError(
            400, "invalid_request", None, "the body is not valid JSON: it is not UTF-8"
        ) from None
    except ValueError:
        # Python refuses to convert integers longer than its digit limit (quadratic-time parsing).
        raise RequestError(
            400,
            "invalid_request",
            None,
            f"the body holds an integer longer than {sys.get_int_max_str_digits()} digits",
        ) from None
    except RecursionError:  # unreachable after the depth check; kept so a gap there stays a 400
        raise RequestError(400, "invalid_request", None, "the JSON body nests too deeply") from None


async def read_body(request: web.Request) -> tuple[dict[str, Any], dict[str, bytes], bool]:
    """(fields, files, from_form) from a JSON or multipart body; 408/413/415/400 on bad bodies."""
    server = request.app[keys.CONFIG].server
    limit = server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise RequestError(413, "payload_too_large", None, f"the request body is larger than {limit} bytes")
    ctype = request.content_type
    if ctype != "multipart/form-data" and ctype not in ("application/json", "application/octet-stream", ""):
        raise RequestError(
            415, "unsupported_media_type", None, f"send application/json or multipart/form-data, not {ctype}"
        )
    try:
        # One deadline for the whole body: a client sending a byte now and then would otherwise hold
        # the connection (and its buffer) for ever.
        async with asyncio.timeout(server.body_timeout_s):
            if ctype == "multipart/form-data":
                return (*await _read_multipart(request, limit), True)
            raw = await request.read()  # aiohttp enforces client_max_size (413) here
    except TimeoutError:
        raise RequestError(
            408,
            "request_timeout",
            None,
            f"the request body did not arrive within {server.body_timeout_s:g} s",
        ) from None
    except (web.RequestPayloadError, HttpProcessingError):
        # Bad chunked framing, a corrupt gzip/deflate/br body, or a body shorter than Content-Length.
        raise RequestError(
            400,
            "invalid_request",
            None,
            "the request body could not be read (bad transfer or content encoding)",
        ) from None
    if not raw.strip():
        raise RequestError(400, "invalid_request", None, "the request body is empty; send a JSON object")
    body = (
        loads_limited(raw) if len(raw) <= INLINE_PARSE_BYTES else await asyncio.to_thread(loads_limited, raw)
    )
    if not isinstance(body, dict):
        raise RequestError(400, "invalid_request", None, "the body must be a JSON object")
    return body, {}, False


async def _read_multipart(request: web.Request, limit: int) -> tuple[dict[str, Any], dict[str, bytes]]:
    fields: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    total = 0
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise RequestError(400, "invalid_request", None, "nested multipart bodies are not supported")
            name = part.name
            if not name:
                raise RequestError(400, "invalid_request", None, "a multipart part has no name")
            if name in fields or name in files:
                # Last-wins would silently drop a value; every field (images included) takes one.
                raise RequestError(
                    400,
                    "invalid_request",
                    name,
                    f"{name} appears more than once in the form; send each field once"
                    + (" (this server takes one image per request)" if name.startswith("image") else ""),
                )
            data = bytearray()
            while chunk := await part.read_chunk():
                total += len(chunk)
                if total > limit:
                    raise RequestError(
                        413, "payload_too_large", name, f"the request body is larger than {limit} bytes"
                    )
                data.extend(chunk)
            if part.filename or (name in ("image", "mask") and _looks_binary(data)):
                files[name] = bytes(data)
            else:
                try:
                    fields[name] = data.decode("utf-8")
                except UnicodeDecodeError:
                    raise RequestError(400, "invalid_request", name, f"{name} is not UTF-8 text") from None
    except RequestError:
        raise
    except (ValueError, AssertionError, RuntimeError) as e:
        raise RequestError(400, "invalid_request", None, f"malformed multipart body: {e}") from None
    return fields, files


def _looks_binary(data: bytes | bytearray) -> bool:
    return b"\0" in data[:512] or data[:4] in (b"\x89PNG", b"RIFF") or data[:2] == b"\xff\xd8"
