"""uvicorn's HTTP/1.1 protocol with a deadline on request headers (uvicorn has none: a client that sends half a
request line and then nothing holds its connection forever)."""

from __future__ import annotations

import asyncio
import os

from uvicorn.protocols.http.h11_impl import H11Protocol

from provenance.api.config import ENV_PREFIX

_TIMEOUT_ENV = ENV_PREFIX + "HEADER_TIMEOUT_S"
_408 = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class HeaderTimeoutH11Protocol(H11Protocol):
    """Closes a connection (after a bare 408) whose request headers are not complete `timeout_s` after it opened,
    or after its first byte of a next request. Bodies have their own deadlines (provenance.api.limits); idle
    keep-alive connections have uvicorn's `timeout_keep_alive`.

    `timeout_s` is a class setting so that `uvicorn.run(..., http=HeaderTimeoutH11Protocol)` can name the class:
    `provenance serve` sets it from ServerConfig.header_timeout_s, and worker processes read it from
    PROVENANCE_HEADER_TIMEOUT_S (which ServerConfig.to_env writes)."""

    timeout_s: float = float(os.environ.get(_TIMEOUT_ENV) or 10.0)

    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._waiting_for_headers():
            if self._header_timer is None:
                self._arm()
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _waiting_for_headers(self) -> bool:
        # no request yet, or the last one answered and a next one begun but its headers not complete
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.timeout_s, self._headers_timed_out)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self._waiting_for_headers() and not self.transport.is_closing():
            self.logger.info(
                "closed a connection from %s: request headers incomplete after %g s",
                self.client[0] if self.client else "?",
                self.timeout_s,
            )
            self.transport.write(_408)
            self.transport.close()
