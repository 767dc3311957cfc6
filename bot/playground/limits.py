"""A request body limit for the playground's HTTP server, checked before anything parses the body.

uvicorn and FastAPI read a body whole, whatever its size; Gradio limits uploaded files
(`max_file_size`) but not the JSON of its API calls. This ASGI middleware answers 413 to a body
over the limit: at once when Content-Length says so, else (chunked) as soon as the bytes read pass
it, before the application has seen any of them.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_large = int(length) > self.max_bytes
            except ValueError:
                await _answer(send, 400, "Content-Length is not a number.")
                return
            if too_large:
                await _answer(send, 413, f"The request body is larger than {self.max_bytes} bytes.")
                return
            await self.app(scope, receive, send)
            return
        # No length given (chunked): read it here, up to the limit, then hand it on.
        chunks: list[Message] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                chunks.append(message)
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await _answer(send, 413, f"The request body is larger than {self.max_bytes} bytes.")
                return
            chunks.append(message)
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return chunks.pop(0) if chunks else await receive()

        await self.app(scope, replay, send)


async def _answer(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
