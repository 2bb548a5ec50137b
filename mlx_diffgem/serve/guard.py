"""What a POST must pass before the app reads it: a JSON Content-Type and a body
within the size limit (an ASGI middleware, so that nothing is read or parsed first).

A body over the limit is refused with 413 without being kept: read and dropped up
to DRAIN_MAX bytes first, since a client that sends its whole body before it reads
the answer (urllib, httpx) would otherwise see the connection reset instead of the
413; a client that waits for `100 Continue` (curl, for large bodies) gets the 413
before it sends anything. After a large body the freed memory goes back to the
system.
"""

from __future__ import annotations

import json
from typing import Any

from .prompts import release_memory

JSON_TYPES = ("application/json",)
TOO_LARGE = "request_too_large"  # the error code of a 413
TRIM_AFTER = 1 << 20  # bytes: a body this large is worth a malloc_trim afterwards
DRAIN_MAX = 64 << 20  # bytes of a refused body read (and dropped) before the 413


def body_error(limit: int) -> str:
    return (
        f"request body: over this server's limit of {limit:,} bytes "
        "(diffgem serve --max-request-bytes)"
    )


def content_type_error(header: bytes | None) -> str | None:
    """None for a JSON body's Content-Type, else the one-line error."""
    got = (header or b"").decode("latin-1").strip()
    media = got.split(";", 1)[0].strip().lower()
    if media in JSON_TYPES or (media.startswith("application/") and "+json" in media):
        return None
    seen = repr(got) if got else "none"
    return (
        f"Content-Type: expected application/json, got {seen} (with curl: "
        "-H 'Content-Type: application/json')"
    )


class RequestGuard:
    """ASGI middleware over the app: checks the POSTs to /v1/."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        problem = content_type_error(headers.get(b"content-type"))
        if problem is not None:
            return await _reply(send, 400, problem, None)
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            if headers.get(b"expect", b"").lower() != b"100-continue":
                await _drain(receive, int(length))
            return await _reply(send, 413, body_error(self.max_bytes), TOO_LARGE)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    from starlette.exceptions import HTTPException

                    if message.get("more_body"):
                        await _drain(receive, DRAIN_MAX)
                    # FastAPI passes an HTTPException from the body read through:
                    # the app's handler answers it (413 with an OpenAI error body)
                    raise HTTPException(413, body_error(self.max_bytes))
            return message

        try:
            await self.app(scope, counted, send)
        finally:
            if seen >= TRIM_AFTER:
                release_memory()


async def _drain(receive: Any, announced: int) -> None:
    """Read the rest of a refused body, dropping it, up to DRAIN_MAX bytes."""
    left = min(announced, DRAIN_MAX)
    while left > 0:
        message = await receive()
        if message["type"] != "http.request":
            return  # the client has gone
        left -= len(message.get("body", b""))
        if not message.get("more_body"):
            return


async def _reply(send: Any, status: int, message: str, code: str | None) -> None:
    from .openai_schema import error_body

    body = json.dumps(error_body(message, "invalid_request_error", None, code))
    headers = [(b"content-type", b"application/json")]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body.encode()})
