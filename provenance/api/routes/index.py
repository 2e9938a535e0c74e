"""GET /v1/index: the index's manifest (descriptors, models, counts, source, builds)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from provenance.api.deps import IndexDep

router = APIRouter(tags=["index"])


@router.get("/index", response_model=dict[str, Any])
def get_manifest(index: IndexDep) -> dict[str, Any]:
    """The manifest.json of the loaded index."""
    return index.manifest
