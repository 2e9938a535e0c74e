"""Driving the ASGI app by hand: a POST whose body arrives one receive() at a time, to test what the app reads."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class AsgiResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    consumed: int  # how many receive() calls the app made: how much of the upload it read


def asgi_post(
    app,
    path: str,
    chunk: Callable[[int], tuple[bytes, bool]],
    headers: list[tuple[bytes, bytes]] | None = None,
    boundary: str = "zzz",
) -> AsgiResponse:
    """POST to `app` at `path`; the i-th receive() (from 1) gets `chunk(i)` = (body bytes, more_body). `headers`
    come after the multipart content-type (a host header is added)."""
    consumed = 0
    sent: list[dict] = []

    async def receive():
        nonlocal consumed
        consumed += 1
        body, more = chunk(consumed)
        return {"type": "http.request", "body": body, "more_body": more}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
            *(headers or []),
            (b"host", b"test"),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
        "state": {},
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return AsgiResponse(start["status"], start["headers"], body, consumed)
