"""POST /v1/scan and /v1/scan/batch: copy detection and provenance evidence for uploaded images."""

from __future__ import annotations

import inspect
from typing import Annotated, Any, Optional

from fastapi import APIRouter, Depends, File, Query, UploadFile
from starlette.concurrency import run_in_threadpool

from provenance.api.deps import ReadyDep
from provenance.api.errors import api_error
from provenance.api.schemas import ErrorResponse, ScanRecordOut
from provenance.api.state import ServiceState
from provenance.api.uploads import display_name, keep_upload, read_upload, upload_too_large
from provenance.errors import error_from_code
from provenance.options import ScanOptions, Thresholds
from provenance.scan import match_verdicts
from provenance.types import SCAN_SCHEMA_VERSION, ScanRecord

router = APIRouter(tags=["scan"])
BATCH_GROUP = 4  # files of a batch request read and scanned together

MatchVerdicts = Annotated[
    bool,
    Query(
        description="Add each match's own verdict (from its descriptor's score alone) "
        "to the matches; the web page uses it for its badges."
    ),
]


def _scan_overrides_dependency() -> Any:
    """A dependency with one optional query parameter per per-request scan option (ScanOptions.request_names),
    its description the option's; it returns the ones given."""
    params = [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                Optional[ScanOptions.model_fields[name].annotation],
                Query(
                    description=f"{ScanOptions.model_fields[name].description} Unset: the server's setting "
                    f"(/healthz: options)."
                ),
            ],
        )
        for name in ScanOptions.request_names()
    ]

    def scan_overrides(**given: Any) -> dict[str, Any]:
        return {k: v for k, v in given.items() if v is not None}

    scan_overrides.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return scan_overrides


ScanOverrides = Annotated[dict[str, Any], Depends(_scan_overrides_dependency())]
_BAD_OPTIONS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "bad parameters, or options that cannot go together (invalid_options)"}
}


@router.post(
    "/scan",
    response_model=ScanRecordOut,
    response_model_exclude_unset=True,
    responses={
        413: {"model": ErrorResponse, "description": "file over the upload limit, or more pixels than allowed (bomb)"},
        415: {"model": ErrorResponse, "description": "not a decodable image"},
        **_BAD_OPTIONS,
    },
)
async def scan(
    state: ReadyDep,
    file: Annotated[UploadFile, File(description="The image to check.")],
    overrides: ScanOverrides,
    match_verdicts: MatchVerdicts = False,
) -> dict[str, Any]:
    """Scan one image: its best corpus matches, the verdict, and its watermark / C2PA / metadata evidence."""
    options = state.options_for(overrides)  # a broken rule is a 400 before the upload is read
    name = display_name(file.filename)
    data = await read_upload(file, state.config.max_upload_bytes)
    if data is None:
        raise upload_too_large(name, state.config.max_upload_bytes)
    (record,) = await state.scan([(name, data)], options)
    if record.verdict == "error":  # the record's error_code gives the status: nothing is decoded again
        raise error_from_code(record.error_code, record.error or "the scan failed")
    await _keep(state, [(data, record)])
    return _present(state, record, options.thresholds, match_verdicts)


@router.post(
    "/scan/batch", response_model=list[ScanRecordOut], response_model_exclude_unset=True, responses=_BAD_OPTIONS
)
async def scan_batch(
    state: ReadyDep,
    files: Annotated[list[UploadFile], File(description="The images to check.")],
    overrides: ScanOverrides,
    match_verdicts: MatchVerdicts = False,
) -> list[dict[str, Any]]:
    """Scan several images; records come back in upload order, and a bad file gets an error record
    (verdict "error", with its error_code) while the others are scanned as usual. 400 for no files or more than
    the configured maximum (bad_batch)."""
    options = state.options_for(overrides)
    limit = state.config.max_batch_files
    if not files or len(files) > limit:
        raise api_error(400, "bad_batch", f"send 1 to {limit} files in the `files` field (got {len(files)})")
    # A few files at a time: their bytes are read from the spooled uploads (on disk past 1 MB) and released once
    # scanned, so a batch holds at most BATCH_GROUP uploads and their decodes in memory, however many it sends.
    out: list[dict[str, Any]] = []
    for start in range(0, len(files), BATCH_GROUP):
        group: list[tuple[int, str, bytes]] = []  # (position, name, bytes) of the files to scan
        records: dict[int, ScanRecord] = {}
        for i in range(start, min(start + BATCH_GROUP, len(files))):
            name = display_name(files[i].filename, f"upload-{i}")
            data = await read_upload(files[i], state.config.max_upload_bytes)
            await files[i].close()
            if data is None:
                records[i] = ScanRecord.failed(name, upload_too_large(name, state.config.max_upload_bytes))
            else:
                group.append((i, name, data))
        if group:
            scanned = await state.scan([(name, data) for _, name, data in group], options)
            records.update({i: r for (i, _, _), r in zip(group, scanned, strict=True)})
            await _keep(state, [(data, r) for (_, _, data), r in zip(group, scanned, strict=True)])
        del group
        out += [_present(state, records[i], options.thresholds, match_verdicts) for i in sorted(records)]
    return out


async def _keep(state: ServiceState, pairs: list[tuple[bytes, ScanRecord]]) -> None:
    folder = state.config.keep_uploads
    if folder is None:
        return
    for data, record in pairs:
        if record.verdict != "error":
            await run_in_threadpool(keep_upload, folder, data, record)


def _present(
    state: ServiceState, record: ScanRecord, thresholds: Thresholds, with_match_verdicts: bool
) -> dict[str, Any]:
    """The record's JSON with its schema version, and each match's verdict (computed by the library) when asked;
    match sources never name a server path."""
    d = {"schema_version": SCAN_SCHEMA_VERSION, **record.to_dict()}
    for md in d.get("matches", []):
        state.redactor.hit(md)
    if with_match_verdicts and record.verdict != "error":
        for md, verdict in zip(d["matches"], match_verdicts(record, thresholds), strict=True):
            md["verdict"] = verdict
    return d
