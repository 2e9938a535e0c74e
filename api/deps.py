"""Route dependencies, as Annotated aliases: the shared state, the loaded index/searcher, API-key checks."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from api.errors import api_error
from api.state import ServiceState
from provenance.search import Searcher
from provenance.store import ProvenanceIndex


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]


def get_ready_state(state: StateDep) -> ServiceState:
    """The state once models and index are loaded; 503 (with Retry-After) until then."""
    if state.status == "loading":
        raise api_error(503, "loading", "the index and models are still loading; retry shortly",
                        headers={"Retry-After": "2"})
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


def require_api_key(request: Request, state: StateDep) -> None:
    """When keys are configured, /v1 needs `Authorization: Bearer KEY` or `X-API-Key: KEY`."""
    keys = state.config.api_keys
    if not keys:
        return
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if given is None and auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    # Compare against every key in constant time so timing does not reveal a key's prefix.
    if given is None or not any(hmac.compare_digest(given.encode(), k.encode()) for k in keys):
        raise api_error(401, "unauthorized",
                        "missing or wrong API key: send `Authorization: Bearer KEY` or `X-API-Key: KEY`",
                        headers={"WWW-Authenticate": "Bearer"})
