"""Searching the corpus: by image (SSCD/PDQ/CLIP), by text (OpenCLIP) and by caption words (full text)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, UploadFile
from starlette.concurrency import run_in_threadpool

from provenance.api.deps import IndexDep, ReadyDep, SearcherDep, StateDep
from provenance.api.errors import api_error
from provenance.api.schemas import CaptionSearchOut, ErrorResponse, ImageSearchOut, TextQuery, TextSearchOut
from provenance.api.uploads import display_name, read_upload, upload_too_large
from provenance.errors import DescriptorUnavailableError
from provenance.images import DRAFT_MIN_SIDE, decode_image
from provenance.search import drop_far_pdq, merge_matches

router = APIRouter(prefix="/search", tags=["search"])
K = Annotated[int, Query(ge=1, le=100, description="How many results.")]


@router.post(
    "/image",
    response_model=ImageSearchOut,
    response_model_exclude_unset=True,
    responses={413: {"model": ErrorResponse}, 415: {"model": ErrorResponse}},
)
async def search_image(
    state: ReadyDep,
    searcher: SearcherDep,
    file: Annotated[UploadFile, File(description="The query image.")],
    k: Annotated[int, Form(ge=1, le=100, description="Results per descriptor.")] = 10,
) -> dict[str, Any]:
    """Nearest corpus images by every image descriptor of the index (no watermark checks: see /v1/scan)."""
    name = display_name(file.filename)
    data = await read_upload(file, state.config.max_upload_bytes)
    if data is None:
        raise upload_too_large(name, state.config.max_upload_bytes)
    # a bad image raises the library's error, which the app's one handler maps to 415 / 413
    # no invisible-mark check here: every descriptor reads a small image, so a JPEG may decode at reduced size
    decoded = await state.run_search(decode_image, data, name, state.config.scan.max_pixels, DRAFT_MIN_SIDE)
    per_desc = await state.run_search(searcher.search_image, decoded.image, k)
    # As in scan records, the merged list leaves out far PDQ neighbours; by_descriptor keeps k of each.
    public = state.redactor.hit
    return {
        "matches": [public(m.to_dict()) for m in merge_matches(drop_far_pdq(per_desc), k)],
        "by_descriptor": {n: [public(m.to_dict()) for m in ms] for n, ms in per_desc.items()},
    }


@router.post(
    "/text",
    response_model=TextSearchOut,
    response_model_exclude_unset=True,
    responses={409: {"model": ErrorResponse, "description": "the index has no OpenCLIP embeddings"}},
)
async def search_text(state: ReadyDep, searcher: SearcherDep, query: TextQuery) -> dict[str, Any]:
    """Corpus images whose OpenCLIP embedding is closest to the text's (needs an index built with clip)."""
    if "clip" not in searcher.index.specs:
        raise api_error(
            409,
            "text_search_unavailable",
            f"the index was built without clip (it has {', '.join(searcher.index.specs)}); "
            "use caption search (/v1/search/caption), or rebuild with --descriptors sscd,pdq,clip",
        )
    try:
        matches = await state.run_search(searcher.search_text, query.text, query.k)
    except DescriptorUnavailableError as e:
        raise api_error(409, "text_search_unavailable", str(e)) from None
    return {"query": query.text, "matches": [state.redactor.hit(m.to_dict()) for m in matches]}


@router.get("/caption", response_model=CaptionSearchOut)
async def search_caption(
    index: IndexDep,
    state: StateDep,
    q: Annotated[
        str,
        Query(
            min_length=1,
            description='Words; "quotes" keep a phrase, word* '
            "matches a prefix (2+ letters). Repeated words count once; the "
            "server caps words, length and time (400 query_too_long, 503 "
            "query_timeout).",
        ),
    ],
    k: K = 10,
) -> dict[str, Any]:
    """Full-text search of the corpus captions (BM25): every word must appear."""
    hits = await run_in_threadpool(index.search_caption, q, k, state.caption_limits)
    return {"query": q, "hits": [state.redactor.hit(h.to_dict()) for h in hits]}
