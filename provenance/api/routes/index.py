"""GET /v1/index: the index's manifest (descriptors, models, counts; source and builds for operators)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from provenance.api.deps import IndexDep, StateDep

router = APIRouter(tags=["index"])


@router.get("/index", response_model=dict[str, Any])
def get_manifest(index: IndexDep, state: StateDep) -> dict[str, Any]:
    """The manifest.json of the loaded index. Its build history and the source's location (server paths) are
    left out unless the server allows them (PROVENANCE_EXPOSE_INDEX_PATHS=true)."""
    return state.redactor.manifest(index.manifest, state.config.expose_index_paths)
