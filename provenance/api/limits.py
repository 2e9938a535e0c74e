"""Limits that bound what one request may cost, enforced as ASGI middleware before and while its body is read.

- BodyGuardMiddleware: a byte limit per path, read deadlines (408), and for multipart uploads the count of files,
  a repeated single-file field and the pixels of a batch (summed from each image's header as its part arrives);
- ScanSlotsMiddleware: a bounded number of scans in progress, 503 with Retry-After beyond it;
- RateLimitMiddleware: token buckets per client address and per API key, 429 with Retry-After.
Each refusal is the JSON error of provenance.api.errors, sent before the rest of the body is read."""

from __future__ import annotations

import asyncio
import hashlib
import io
import math
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from provenance.api.errors import error_body, send_json, status_for


class RequestRefused(StarletteHTTPException):
    """Raised from inside `receive` when a request breaks a limit; an HTTPException so that FastAPI's body reader
    passes it through (it turns other exceptions into a generic 400). The connection closes after the answer."""

    def __init__(self, code: str, message: str, status: int | None = None, headers: dict[str, str] | None = None):
        super().__init__(
            status or status_for(code),
            {"code": code, "message": message},  # type: ignore[arg-type]
            headers={"Connection": "close", **(headers or {})},
        )
        self.code = code
        self.message = message


@dataclass(frozen=True)
class BodyRules:
    """What a request body to one path may hold."""

    max_bytes: int
    max_files: int | None = None  # file parts in a multipart body; None = no rule
    files_field: str | None = None  # the form field the files come in (named in messages)
    max_pixels: int | None = None  # the images' pixels summed from their headers; None = not counted
    # the per-image limit (ScanOptions.max_pixels): an image over it is refused before decoding, so it counts 0;
    # one whose size is not in its first SNIFF_BYTES counts this much, the most it can cost
    max_image_pixels: int = 0


SNIFF_BYTES = 1 << 20  # the most of each file part kept to read its image header
_FIRST_TRY = 16 * 1024  # after the first piece, a header is read again at 16 KiB, 32 KiB, ... (EXIF/ICC push it)


class BodyGuardMiddleware:
    """Enforce BodyRules and read deadlines while the body streams in, before anything buffers it.

    A declared Content-Length over the limit is refused without reading; otherwise bytes are counted as they
    arrive. Each `receive` must bring data within `idle_timeout_s` and the whole body must arrive within
    `total_timeout_s` (a 408): uvicorn itself waits for a slow body forever."""

    def __init__(
        self, app: ASGIApp, rules_for: Callable[[str], BodyRules | None], idle_timeout_s: float, total_timeout_s: float
    ):
        self.app = app
        self.rules_for = rules_for
        self.idle_timeout_s = idle_timeout_s
        self.total_timeout_s = total_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (rules := self.rules_for(scope["path"])) is None:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = _int(headers.get("content-length"))
        if declared is not None and declared > rules.max_bytes:
            await send_json(
                send,
                413,
                error_body(
                    413,
                    "too_large",
                    f"request body of {declared:,} bytes exceeds the limit of {rules.max_bytes:,} bytes",
                ),
            )
            return
        inspector = _MultipartInspector.for_request(headers, rules)
        deadline = time.monotonic() + self.total_timeout_s
        received = 0
        done = False
        started = False

        async def guarded_receive() -> Message:
            nonlocal received, done
            if done:  # the body is complete: what follows is a disconnect, which may take any time
                return await receive()
            timeout = min(self.idle_timeout_s, deadline - time.monotonic())
            try:
                message = await asyncio.wait_for(receive(), timeout=max(timeout, 0.001))
            except TimeoutError:
                raise RequestRefused(
                    "request_timeout", _timeout_message(received, self.idle_timeout_s, self.total_timeout_s)
                ) from None
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > rules.max_bytes:
                    raise RequestRefused("too_large", f"request body exceeds the limit of {rules.max_bytes:,} bytes")
                if inspector is not None and chunk:
                    inspector.feed(chunk)
                done = not message.get("more_body", False)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except RequestRefused as e:  # raised where no exception handler turned it into a response
            if started:
                raise
            await send_json(
                send,
                e.status_code,
                error_body(e.status_code, e.code, e.message),
                dict(e.headers) if e.headers else None,
            )


def _timeout_message(received: int, idle: float, total: float) -> str:
    return (
        f"the request body stopped arriving (after {received:,} bytes): each part of it must come within "
        f"{idle:g} s and all of it within {total:g} s"
    )


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class _MultipartInspector:
    """Follows a multipart body as it streams (python-multipart's parser, the one Starlette uses) and raises
    RequestRefused at the part header that breaks a rule, or at the image header that passes the pixel budget."""

    def __init__(self, boundary: bytes, rules: BodyRules):
        multipart, _ = _multipart()
        self.rules = rules
        self.files = 0
        self.pixels = 0
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._is_file = False
        self._head = bytearray()  # the first SNIFF_BYTES of the current file part
        self._sized = False
        self._next_try = 0
        self._broken = False  # malformed multipart: Starlette reports it; stop inspecting
        self._parser = multipart.MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value_cb,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
            },
        )

    @classmethod
    def for_request(cls, headers: Headers, rules: BodyRules) -> _MultipartInspector | None:
        if rules.max_files is None and rules.max_pixels is None:
            return None
        content_type, params = _parse_options(headers.get("content-type", ""))
        if content_type != b"multipart/form-data" or b"boundary" not in params:
            return None
        return cls(params[b"boundary"], rules)

    def feed(self, chunk: bytes) -> None:
        if self._broken:
            return
        try:
            self._parser.write(chunk)
        except RequestRefused:
            raise
        except Exception:
            self._broken = True

    # parser callbacks

    def _part_begin(self) -> None:
        self._disposition, self._is_file, self._sized = b"", False, False
        self._head = bytearray()
        self._next_try = 0  # the first piece of data: a PNG's or JPEG's size is usually in it

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_cb(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, options = _parse_options(self._disposition)
        self._is_file = b"filename" in options
        if not self._is_file or self.rules.max_files is None:
            return
        self.files += 1
        if self.files > self.rules.max_files:
            field = self.rules.files_field or "file"
            if self.rules.max_files == 1:
                raise RequestRefused(
                    "repeated_field", f"send one file, in the `{field}` field: this request has more than one"
                )
            raise RequestRefused(
                "bad_batch", f"send 1 to {self.rules.max_files} files in the `{field}` field: this request has more"
            )

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._is_file or self._sized or self.rules.max_pixels is None:
            return
        room = SNIFF_BYTES - len(self._head)
        self._head += data[start : min(end, start + room)]
        # try at each doubling of what we hold, so a long header costs a few attempts, not one per chunk
        if len(self._head) >= self._next_try or len(self._head) >= SNIFF_BYTES:
            self._next_try = max(2 * len(self._head), _FIRST_TRY)
            size = image_size(bytes(self._head))
            if size is not None:
                self._count(size[0] * size[1])
            elif len(self._head) >= SNIFF_BYTES:
                self._count(self.rules.max_image_pixels)  # a header past 1 MB: count what it may cost

    def _part_end(self) -> None:
        if self._is_file and not self._sized and self.rules.max_pixels is not None:
            size = image_size(bytes(self._head))  # the whole file is in _head: not an image costs nothing
            self._count(size[0] * size[1] if size else 0)
        self._head = bytearray()

    def _count(self, pixels: int) -> None:
        self._sized = True
        if self.rules.max_image_pixels and pixels > self.rules.max_image_pixels:
            pixels = 0  # refused before decoding: costs nothing
        self.pixels += pixels
        if self.rules.max_pixels is not None and self.pixels > self.rules.max_pixels:
            raise RequestRefused(
                "too_many_pixels",
                f"the images of this request hold more than "
                f"{self.rules.max_pixels:,} pixels in all (read from their "
                f"headers): send fewer or smaller images",
            )


def _multipart() -> tuple[Any, Callable[[Any], tuple[bytes, dict[bytes, bytes]]]]:
    """python-multipart (the parser of Starlette's forms; imported as `multipart` before its 0.0.13) and its
    header-options parser."""
    try:
        import python_multipart
        from python_multipart.multipart import parse_options_header
    except ImportError:  # pragma: no cover - older python-multipart
        import multipart as python_multipart  # type: ignore[no-redef]
        from multipart.multipart import parse_options_header  # type: ignore[no-redef]
    return python_multipart, parse_options_header


def _parse_options(value: Any) -> tuple[bytes, dict[bytes, bytes]]:
    return _multipart()[1](value)


def image_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from the first bytes of an image file, without decoding it; None when they do not say.
    PNG is read from IHDR directly (Pillow reads every chunk up to the pixels before it answers)."""
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24 and head[12:16] == b"IHDR":
        return struct.unpack(">II", head[16:24])
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(head)) as im:
                return im.size
    except Image.DecompressionBombError as e:  # over Pillow's own ceiling: the size is in its message
        import re

        m = re.search(r"\((\d+) pixels\)", str(e))
        return (int(m.group(1)), 1) if m else None
    except Exception:
        return None


class ScanSlotsMiddleware:
    """At most `slots` scan requests in progress (their uploads included); one more is answered 503 with
    Retry-After before its body is read, so a crowd of clients queues at their end, not in the server's memory."""

    def __init__(self, app: ASGIApp, paths: frozenset[str], slots: int, retry_after_s: int):
        self.app = app
        self.paths = paths
        self.slots = slots
        self.retry_after_s = retry_after_s
        self.active = 0  # read by tests and the soak benchmark

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if self.active >= self.slots:
            await send_json(
                send,
                503,
                error_body(503, "busy", f"the server is scanning {self.slots} requests already: retry later"),
                {"Retry-After": str(self.retry_after_s)},
            )
            return
        self.active += 1  # the event loop is one thread: no lock needed
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


class TokenBuckets:
    """Token buckets by name: `rate_per_s` tokens a second up to `burst`; the least recently used are forgotten
    past `max_names`, so memory stays bounded whatever the number of clients."""

    def __init__(self, rate_per_s: float, burst: int, max_names: int = 100_000):
        self.rate = rate_per_s
        self.burst = float(burst)
        self.max_names = max_names
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # name -> (tokens, at)

    def take(self, name: str, now: float | None = None) -> float:
        """0 when a request may go now (one token taken), else the seconds until one will be available."""
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.pop(name, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate
        self._buckets[name] = (tokens, now)
        while len(self._buckets) > self.max_names:
            self._buckets.popitem(last=False)
        return wait


class RateLimitMiddleware:
    """429 with Retry-After for /v1 requests beyond a client address's or an API key's rate. Runs after the key
    check, so a key's bucket is only ever a valid key's (stored as a hash, never the key)."""

    def __init__(self, app: ASGIApp, per_client: TokenBuckets | None, per_key: TokenBuckets | None):
        self.app = app
        self.per_client = per_client
        self.per_key = per_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == "/v1" or path.startswith("/v1/")):
            await self.app(scope, receive, send)
            return
        waits = []
        if self.per_client is not None:
            client = scope.get("client")
            waits.append(("client", self.per_client.take(client[0] if client else "?")))
        key = _api_key(Headers(scope=scope))
        if self.per_key is not None and key:
            waits.append(("API key", self.per_key.take(hashlib.sha256(key.encode()).hexdigest()[:32])))
        over = [(who, w) for who, w in waits if w > 0]
        if over:
            who, wait = max(over, key=lambda x: x[1])
            await send_json(
                send,
                429,
                error_body(429, "rate_limited", f"too many requests from this {who}: retry in {math.ceil(wait)} s"),
                {"Retry-After": str(max(1, math.ceil(wait)))},
            )
            return
        await self.app(scope, receive, send)


def _api_key(headers: Headers) -> str | None:
    given = headers.get("x-api-key")
    auth = headers.get("authorization", "")
    if given is None and auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    return given or None
