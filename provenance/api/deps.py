"""Route dependencies, as Annotated aliases: the shared state, the loaded index/searcher, API-key checks."""

from __future__ import annotations

import hmac
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from provenance.api.errors import api_error, error_body, send_json
from provenance.api.state import ServiceState
from provenance.search import Searcher
from provenance.store import ProvenanceIndex

if TYPE_CHECKING:
    from provenance.registry import Registry


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


def _given_key(headers: Headers) -> str | None:
    given = headers.get("x-api-key")
    auth = headers.get("authorization", "")
    if given is None and auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    return given


def matching_key(headers: Headers, keys: tuple[str, ...]) -> str | None:
    """The key of `keys` that `Authorization: Bearer KEY` or `X-API-Key: KEY` carries, or None."""
    given = _given_key(headers)
    if given is None:
        return None
    # Compare against every key in constant time so timing does not reveal a key's prefix.
    found = None
    for k in keys:
        if hmac.compare_digest(given.encode(), k.encode()):
            found = k
    return found


def api_key_is_valid(headers: Headers, keys: tuple[str, ...]) -> bool:
    """True when `Authorization: Bearer KEY` or `X-API-Key: KEY` carries one of `keys`."""
    return matching_key(headers, keys) is not None


def require_api_key(request: Request, state: StateDep) -> None:
    """When keys are configured, /v1 needs a key. ApiKeyMiddleware already refused bad requests before reading
    their bodies; this dependency documents the 401 in the OpenAPI schema and guards any mount without it."""
    keys = tuple(state.config.key_scopes)
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


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key id (a hash of the key, never the key; "anonymous" on a server without keys) and its
    scopes."""

    key_id: str
    scopes: frozenset[str]

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes


def get_principal(request: Request, state: StateDep) -> Principal:
    from provenance.registry import key_id

    scopes = state.config.key_scopes
    if not scopes:
        anonymous = {"read"} | ({"optout:write"} if state.config.allow_anonymous_writes else set())
        return Principal("anonymous", frozenset(anonymous))
    key = matching_key(request.headers, tuple(scopes))
    if key is None:
        raise api_error(401, "unauthorized", UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})
    return Principal(key_id(key), scopes[key])


def require_scope(scope: str) -> Callable[[Request, ServiceState], Principal]:
    """A dependency that gives the Principal when it holds `scope`: 403 otherwise (on a server without keys, a write
    is refused unless it was started with --allow-anonymous-writes)."""

    def check(request: Request, state: StateDep) -> Principal:
        p = get_principal(request, state)
        if scope not in p.scopes:
            if p.key_id == "anonymous":
                raise api_error(
                    403,
                    "writes_disabled",
                    "this server has no API keys and refuses writes: configure "
                    "PROVENANCE_API_KEYS (KEY:optout:write) or start it with --allow-anonymous-writes",
                )
            raise api_error(403, "forbidden", f"this API key lacks the {scope!r} scope")
        return p

    return check


WriterDep = Annotated[Principal, Depends(require_scope("optout:write"))]


def get_registry(request: Request, state: StateDep) -> Registry:
    """The server's do-not-train registry (PROVENANCE_REGISTRY), opened on first use."""
    from provenance.registry import Registry

    path = state.config.registry
    if path is None:
        raise api_error(
            503,
            "registry_unavailable",
            "this server has no opt-out registry: set PROVENANCE_REGISTRY (or serve --registry FILE)",
        )
    with _registry_lock:
        if state.registry is None:
            state.registry = Registry(path)
        return state.registry


_registry_lock = threading.Lock()
