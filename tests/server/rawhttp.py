"""Raw HTTP over a socket, for requests no well-behaved client library sends (bytes that aren't
UTF-8 in a header, HTTP/1.0 without Host, a header or body that never finishes)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_response(data: bytes) -> RawResponse:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    return RawResponse(status, headers, body)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return bytes(out)


async def open_raw(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(url)
    return await asyncio.open_connection(parts.hostname, parts.port)


async def exchange(url: str, request: bytes, *, limit_s: float = 60.0) -> RawResponse:
    """Send `request` (which should close the connection: HTTP/1.0 or `Connection: close`) and read
    the whole answer."""
    reader, writer = await open_raw(url)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), limit_s)
    finally:
        writer.close()
    return parse_response(data)


def http_request(
    method: str,
    path: str,
    *,
    headers: dict[str, bytes | str] | None = None,
    body: bytes = b"",
    version: str = "1.1",
) -> bytes:
    lines = [f"{method} {path} HTTP/{version}".encode()]
    all_headers: dict[str, bytes | str] = (
        {"Host": "127.0.0.1", "Connection": "close"} if version == "1.1" else {}
    )
    all_headers.update(headers or {})
    if body or method == "POST":
        all_headers.setdefault("Content-Length", str(len(body)))
    for name, value in all_headers.items():
        lines.append(name.encode() + b": " + (value if isinstance(value, bytes) else value.encode()))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
