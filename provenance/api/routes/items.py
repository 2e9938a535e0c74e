"""GET /v1/items/{id} and its thumbnail: corpus items looked up by id in the index, never by file path."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from provenance.api.deps import IndexDep, StateDep, get_registry
from provenance.api.errors import api_error
from provenance.api.schemas import ErrorResponse, ItemOut
from provenance.errors import ItemNotFoundError

router = APIRouter(tags=["items"])
_404: dict[int | str, dict[str, Any]] = {404: {"model": ErrorResponse, "description": "no such item (or no thumbnail)"}}


# Registered before /items/{id} because ids may contain "/" (the `path` converter would swallow "/thumbnail").
@router.get(
    "/items/{item_id:path}/thumbnail",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}, "description": "the item's small JPEG thumbnail"}, **_404},
)
async def get_thumbnail(item_id: str, index: IndexDep) -> Response:
    """The item's thumbnail as stored in the index (at most 256 px on the long side; 160 px in older indexes)."""
    try:
        index.row(item_id)
    except ItemNotFoundError as e:
        raise api_error(404, "item_not_found", str(e)) from None
    data = await run_in_threadpool(index.thumbnail, item_id)
    if data is None:
        raise api_error(
            404, "no_thumbnail", f"item {item_id!r} has no stored thumbnail (index built with --no-thumbnails)"
        )
    # Items never change inside one built index, so browsers may cache thumbnails for a day.
    return Response(content=data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})


@router.get("/items/{item_id:path}", response_model=ItemOut, responses=_404)
async def get_item(item_id: str, request: Request, index: IndexDep, state: StateDep) -> dict[str, Any]:
    """The item's metadata: caption, source, license, size, sha256 and any extra fields of its corpus; on a server
    with a registry, `opted_out`: the opt-out that covers it (one item's lookup), or null."""
    try:
        item = state.redactor.hit(await run_in_threadpool(index.item, item_id))
    except ItemNotFoundError as e:
        raise api_error(404, "item_not_found", str(e)) from None
    if state.config.registry is not None:
        from provenance.registry import reasons_for_ids

        registry = get_registry(request, state)
        reasons = await run_in_threadpool(reasons_for_ids, registry, index, [item_id], state.config.scan.thresholds)
        item["opted_out"] = reasons.get(item_id)
    return item
