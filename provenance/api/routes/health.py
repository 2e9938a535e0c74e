"""GET /healthz: loading status, what a scan checks, the options a request may set, and the limits to respect."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from provenance.api.deps import StateDep
from provenance.api.schemas import ChecksOut, HealthOut, ScanOptionOut
from provenance.api.state import ServiceState
from provenance.errors import InvalidOptionsError
from provenance.options import ScanOptions

router = APIRouter(tags=["health"])
# the limits a client needs to know to stay within them (the rest are the operator's business)
PUBLIC_LIMITS = (
    "max_upload_bytes",
    "max_batch_files",
    "max_batch_bytes",
    "max_batch_pixels",
    "caption_max_terms",
    "caption_max_chars",
)


@router.get(
    "/healthz", response_model=HealthOut, responses={503: {"model": HealthOut, "description": "loading or failed"}}
)
def healthz(state: StateDep):
    """200 once the index and models are loaded; 503 with the same body while loading or after a failed load."""
    body = HealthOut(
        status=state.status,
        max_upload_bytes=state.config.max_upload_bytes,
        auth=bool(state.config.api_keys),
        registry=state.config.registry is not None,
        anonymous_writes=not state.config.api_keys and state.config.allow_anonymous_writes,
        contact=state.config.contact,
        error=state.redactor.text(state.error) if state.error else None,
        limits={
            "max_pixels": state.config.scan.max_pixels,
            **{name: getattr(state.config, name) for name in PUBLIC_LIMITS},
        },
    )
    if state.status == "ready" and state.index is not None:
        body.index = state.index.manifest.get("name")
        body.items = len(state.index)
        body.checks = ChecksOut(**state.checks, notes=state.notes)
        body.options = _request_options(state)
        body.text_search = "clip" in state.index.specs
    status = 200 if state.status == "ready" else 503
    return JSONResponse(body.model_dump(), status_code=status)


def _request_options(state: ServiceState) -> list[ScanOptionOut]:
    """Each per-request option with the server's value; available when turning it on is valid here and the check
    it is a way of running is on."""
    out = []
    base = state.config.scan
    for name in ScanOptions.request_names():
        field = ScanOptions.model_fields[name]
        needs = ScanOptions.meta(name).get("needs")
        try:
            base.with_overrides(**{name: True})
            available = not needs or bool(state.checks.get(needs))
        except InvalidOptionsError:
            available = False
        out.append(
            ScanOptionOut(
                name=name,
                title=field.title or name,
                description=field.description or "",
                default=bool(getattr(base, name)),
                available=available,
            )
        )
    return out
