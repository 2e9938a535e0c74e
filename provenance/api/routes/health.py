"""GET /healthz: loading status, what a scan checks, and the limits a client should respect."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from provenance.api.deps import StateDep
from provenance.api.schemas import ChecksOut, HealthOut

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut, responses={503: {"model": HealthOut, "description": "loading or failed"}})
def healthz(state: StateDep):
    """200 once the index and models are loaded; 503 with the same body while loading or after a failed load."""
    body = HealthOut(status=state.status, max_upload_bytes=state.config.max_upload_bytes,
                     auth=bool(state.config.api_keys), error=state.error)
    if state.status == "ready" and state.index is not None:
        body.index = state.index.manifest.get("name")
        body.items = len(state.index)
        body.checks = ChecksOut(**asdict(state.checks))
        body.text_search = "clip" in state.index.specs
    status = 200 if state.status == "ready" else 503
    return JSONResponse(body.model_dump(), status_code=status)
