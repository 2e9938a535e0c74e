"""Route dependencies, as Annotated aliases: the shared state, the loaded index/searcher, API-key checks."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from provenance.api.errors import api_error, error_body, send_json
from provenance.api.state import ServiceState
from provenance.search import Searcher
from provenance.store import ProvenanceIndex


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]


def get_ready_state(state: StateDep) -> ServiceState:
    """The state once models and index are loaded; 503 (with Retry-After) until then."""
    if state.status == "loading":
        raise api_error(
            503, "loading", "the index and models are still loading; retry shortly", headers={"Retry-After": "2"}
        )
    if state.status == "error":
        raise api_error(503, "unavailable", f"the server could not load its index: {state.error}")
    return state


ReadyDep = Annotated[ServiceState, Depends(get_ready_state)]


def get_index(state: ReadyDep) -> ProvenanceIndex:
    assert state.index is not None  # guaranteed by status == "ready"
    return state.index


def get_searcher(state: ReadyDep) -> Searcher:
    assert state.searcher is not None
    return state.searcher


IndexDep = Annotated[ProvenanceIndex, Depends(get_index)]
SearcherDep = Annotated[Searcher, Depends(get_searcher)]


UNAUTHORIZED = "missing or wrong API key: send `Authorization: Bearer KEY` or `X-API-Key: KEY`"


def api_key_is_valid(headers: Headers, keys: tuple[str, ...]) -> bool:
    """True when `Authorization: Bearer KEY` or `X-API-Key: KEY` carries one of `keys`."""
    given = headers.get("x-api-key")
    auth = headers.get("authorization", "")
    if given is None and auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    # Compare against every key in constant time so timing does not reveal a key's prefix.
    return given is not None and any(hmac.compare_digest(given.encode(), k.encode()) for k in keys)


def require_api_key(request: Request, state: StateDep) -> None:
    """When keys are configured, /v1 needs a key. ApiKeyMiddleware already refused bad requests before reading
    their bodies; this dependency documents the 401 in the OpenAPI schema and guards any mount without it."""
    keys = state.config.api_keys
    if keys and not api_key_is_valid(request.headers, keys):
        raise api_error(401, "unauthorized", UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})


class ApiKeyMiddleware:
    """Refuse /v1 requests without a valid key before their body is read, so that a client without a key cannot
    make the server take in (and parse) a 20 MB upload just to be told 401."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...]):
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        protected = scope["type"] == "http" and (path == "/v1" or path.startswith("/v1/"))
        if protected and self.keys and not api_key_is_valid(Headers(scope=scope), self.keys):
            await send_json(send, 401, error_body(401, "unauthorized", UNAUTHORIZED), {"WWW-Authenticate": "Bearer"})
            return
        await self.app(scope, receive, send)
