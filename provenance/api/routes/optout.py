"""The do-not-train registry over HTTP: register opt-outs (an image, or ids, URLs and domains), remove them, export
them, and check up to 10,000 URLs or file hashes for consent."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from provenance.api.config import ServerConfig
from provenance.api.deps import StateDep, WriterDep, get_ready_state, get_registry
from provenance.api.errors import api_error
from provenance.api.schemas import ErrorResponse
from provenance.api.state import ServiceState
from provenance.api.uploads import display_name, read_upload, upload_too_large
from provenance.registry import (
    MAX_CHECK_ITEMS,
    ContentPrint,
    NewOptout,
    ProofOptions,
    Registry,
    consent_check,
    content_coverage,
    content_print,
    coverage,
)

router = APIRouter(tags=["opt-out"])
RegistryDep = Annotated[Registry, Depends(get_registry)]
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse},
    401: {"model": ErrorResponse},
    403: {"model": ErrorResponse},
    413: {"model": ErrorResponse},
    415: {"model": ErrorResponse},
    422: {"model": ErrorResponse},
}


class OptoutIn(BaseModel):
    """Opt-outs by corpus id, URL or domain (an image goes as multipart `file` instead). All or none are written."""

    model_config = {"extra": "forbid"}
    ids: list[str] = Field(default_factory=list, max_length=MAX_CHECK_ITEMS)
    urls: list[str] = Field(default_factory=list, max_length=MAX_CHECK_ITEMS)
    domains: list[str] = Field(default_factory=list, max_length=1000)
    claimant: str | None = Field(None, max_length=500)
    prove: bool = Field(
        False,
        description="domains: fetch https://DOMAIN/.well-known/provenance-optout.txt now; "
        "ownership is `shown` when it holds this key's token (from a first call without prove)",
    )


class ConsentCheckIn(BaseModel):
    model_config = {"extra": "forbid"}
    urls: list[str] = Field(default_factory=list, max_length=MAX_CHECK_ITEMS)
    sha256: list[str] = Field(default_factory=list, max_length=MAX_CHECK_ITEMS)
    live: bool = Field(
        False,
        description="fetch the signals of URLs the cache lacks (only where the server allows it, "
        "for at most its consent_live_max_urls URLs)",
    )


def _parse(model: type[BaseModel], body: bytes) -> Any:
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()[:5])
        raise api_error(400, "invalid_parameters", problems) from None


@router.post(
    "/optout",
    status_code=201,
    responses=_ERRORS,
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {"schema": OptoutIn.model_json_schema()},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"file": {"type": "string", "format": "binary"}, "claimant": {"type": "string"}},
                        "required": ["file"],
                    }
                },
            }
        }
    },
)
async def add_optout(request: Request, state: StateDep, who: WriterDep, registry: RegistryDep) -> dict[str, Any]:
    """Opt out an image (multipart `file`: it and every exact or replica copy of it in any index) or JSON ids, urls
    and domains (one transaction: a bad value or a failing domain proof writes nothing). Needs `optout:write`."""
    config = state.config
    content = None
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        content, claimant = await _content_print(request, state)
        entries = [
            NewOptout("content", content=content, claimant=str(claimant)[:500] if isinstance(claimant, str) else None)
        ]
    elif ctype.startswith("application/json"):
        body = _parse(OptoutIn, await request.body())
        entries = (
            [NewOptout("id", v, claimant=body.claimant) for v in body.ids]
            + [NewOptout("url", v, claimant=body.claimant) for v in body.urls]
            + [NewOptout("domain", v, claimant=body.claimant, prove=body.prove) for v in body.domains]
        )
        if not entries:
            raise api_error(400, "invalid_parameters", "give ids, urls or domains (or an image as multipart `file`)")
        if len(entries) > MAX_CHECK_ITEMS:
            raise api_error(400, "invalid_optout", f"{len(entries):,} opt-outs: at most {MAX_CHECK_ITEMS:,} a request")
    else:
        raise api_error(
            415,
            "unsupported_media_type",
            "send application/json (ids, urls, domains) or multipart/form-data (an image as `file`)",
        )
    proof = ProofOptions(allow_private_addresses=config.allow_private_addresses)
    optouts = await run_in_threadpool(registry.add_many, entries, who.key_id, proof)
    covered: dict[str, int | None] = {}
    if state.status == "ready" and state.index is not None:
        for o in optouts:  # ids and content: bounded lookups; URLs and domains would read the whole index: null
            ids = await run_in_threadpool(coverage, registry, state.index, o, content, False, config.scan.thresholds)
            covered[o.id] = None if ids is None else len(ids)
    tokens = {
        o.value: registry.domain_token(o.value, who.key_id)
        for o in optouts
        if o.kind == "domain" and o.ownership != "shown"
    }
    return {"optouts": [o.to_dict() for o in optouts], "covered": covered, "domain_tokens": tokens}


async def _content_print(request: Request, state: ServiceState) -> tuple[ContentPrint, Any]:
    """The fingerprint of the multipart `file` (by the index's own models) and the form's `claimant` field."""
    config = state.config
    form = await request.form(max_files=1, max_fields=4)
    file, claimant = form.get("file"), form.get("claimant")
    if not isinstance(file, UploadFile):
        raise api_error(400, "invalid_parameters", "send the image as the multipart field `file`")
    name = display_name(file.filename)
    data = await read_upload(cast(Any, file), config.max_upload_bytes)  # starlette's UploadFile: the same reader
    if data is None:
        raise upload_too_large(name, config.max_upload_bytes)
    ready = get_ready_state(state)
    content = await ready.run_search(content_print, data, ready.searcher, name, config.scan.max_pixels)
    return content, claimant


PREVIEW_IDS = 100  # ids listed by a preview (the count is exact)


@router.post(
    "/optout/preview",
    responses=_ERRORS,
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"file": {"type": "string", "format": "binary"}},
                        "required": ["file"],
                    }
                }
            }
        }
    },
)
async def preview_optout(request: Request, state: StateDep, registry: RegistryDep) -> dict[str, Any]:
    """What opting out this image (multipart `file`) would cover, without writing anything: the index's name, how
    many of its items are exact or replica copies (scan's own verdict) and the first 100 of them, and the opt-out
    already registered for this image, if any. Needs only `read`: the page shows it before asking to confirm."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise api_error(415, "unsupported_media_type", "send the image as multipart/form-data field `file`")
    content, _ = await _content_print(request, state)
    ready = get_ready_state(state)
    assert ready.index is not None  # status == "ready"
    copies = await run_in_threadpool(content_coverage, ready.index, content, state.config.scan.thresholds)
    existing = await run_in_threadpool(registry.find_content, content)
    return {
        "index": ready.index.manifest.get("name"),
        "covered": len(copies),
        "items": [{"id": i, "verdict": v} for i, v, _ in copies[:PREVIEW_IDS]],
        "sha256": content.sha256,
        "already": None if existing is None else existing.reason(created_at=existing.created_at),
    }


@router.delete("/optout/{optout_id}", responses=_ERRORS)
async def remove_optout(optout_id: str, who: WriterDep, registry: RegistryDep) -> dict[str, Any]:
    """Remove an opt-out: only the key that made it, or an `admin` key (the audit log keeps both records)."""
    o = await run_in_threadpool(registry.remove, optout_id, who.key_id, who.admin)
    return {"removed": o.to_dict()}


@router.get(
    "/optout/export",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/plain": {}}, "description": "one value a line (urls: an img2dataset blocklist)"}
    },
)
async def export_optouts(
    registry: RegistryDep,
    fmt: Annotated[
        str, Query(alias="format", pattern="^(urls|ids|sha256)$", description="urls | ids | sha256")
    ] = "urls",
) -> StreamingResponse:
    """The registry's URLs (an img2dataset blocklist), ids or content hashes, one a line (claimants are not exported)."""

    def lines() -> Iterator[str]:
        for value in registry.export_lines(fmt):
            yield value + "\n"

    return StreamingResponse(lines(), media_type="text/plain; charset=utf-8")


@router.post("/consent/check", responses=_ERRORS)
async def check_consent(request: Request, state: StateDep) -> dict[str, Any]:
    """Up to 10,000 URLs or sha256 hashes: for each, `training` (not_allowed | constrained | allowed | unknown), the
    opt-out that covers it, the consent signals (from the server's cache; live fetches only when asked and allowed)
    and, for a hash, the indexed items with that file."""
    config = state.config
    body = _parse(ConsentCheckIn, await request.body())
    if len(body.urls) + len(body.sha256) > MAX_CHECK_ITEMS:
        raise api_error(
            400,
            "invalid_optout",
            f"{len(body.urls) + len(body.sha256):,} URLs and hashes: at most {MAX_CHECK_ITEMS:,} a request",
        )
    if body.live and not config.consent_live_max_urls:
        raise api_error(400, "live_fetch_disabled", "this server answers from its consent cache only (live=false)")
    if body.live and len(body.urls) > config.consent_live_max_urls:
        raise api_error(400, "invalid_parameters", f"live=true: at most {config.consent_live_max_urls} URLs a request")
    registry = get_registry(request, state) if config.registry is not None else None
    index = state.index if state.status == "ready" else None

    def run() -> list[dict[str, Any]]:
        fetcher = _fetcher(config, body.live) if body.urls else None
        try:
            return consent_check(registry, index, body.urls, body.sha256, fetcher)
        finally:
            if fetcher is not None:
                fetcher.close()

    results = await run_in_threadpool(run)
    counts: dict[str, int] = {}
    for r in results:
        counts[r["training"]] = counts.get(r["training"], 0) + 1
    return {
        "results": results,
        "counts": counts,
        "sources": {
            "registry": registry is not None,
            "index": index is not None,
            "signals": "live" if body.live else "cache",
        },
    }


def _fetcher(config: ServerConfig, live: bool) -> Any:
    from provenance.consent import Fetcher, FetchOptions

    return Fetcher(
        FetchOptions(
            offline=not live,
            cache_path=config.consent_cache,
            timeout_s=5.0,
            allow_private_addresses=config.allow_private_addresses,
        )
    )
