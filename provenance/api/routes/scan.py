"""POST /v1/scan and /v1/scan/batch: copy detection and provenance evidence for uploaded images."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Query, UploadFile
from starlette.concurrency import run_in_threadpool

from provenance.api.deps import ReadyDep
from provenance.api.errors import api_error
from provenance.api.schemas import ErrorResponse, ScanRecordOut
from provenance.api.state import InvisibleCheckOff, ServiceState, VisibleCheckOff
from provenance.api.uploads import display_name, keep_upload, read_upload
from provenance.errors import DecompressionBombError, UnreadableImageError
from provenance.images import decode_image
from provenance.scan import Thresholds, decide_verdict
from provenance.types import Match, ScanRecord

router = APIRouter(tags=["scan"])

MatchVerdicts = Annotated[bool, Query(description="Add each match's own verdict (from its descriptor's score alone) "
                                                  "to the matches; the web page uses it for its badges.")]
VisibleThorough = Annotated[bool | None, Query(description=(
    "Which visible-watermark check reads the image: true for the thorough mix, a head tuned at 512 px on the image "
    "and its mirror with the 288 px head (finds more small and faint marks: held-out AUC 0.95 against 0.90; ~120 ms "
    "more CPU per image), false for the 288 px head alone that reuses the "
    "copy-detection pass; unset for the server's default (/healthz: checks.visible_thorough). The record's "
    "watermarks.visible.input_sizes says which one ran."))]
CentreView = Annotated[bool | None, Query(description=(
    "Whether SSCD also matches the centre 60% of the image, keeping each corpus item's better score (scan "
    "--centre-view): finds a photo shown small inside a screenshot or frame, at the cost of a second SSCD pass. Unset "
    "for the server's default (/healthz: checks.centre_view); the record's extra.sscd_view is \"centre\" when the "
    "top match came from it."))]
InvisibleCrops = Annotated[bool | None, Query(description=(
    "Whether invisible marks (Stable Diffusion's, ours) are also read as in a crop of a marked image: every block-grid "
    "offset, original width and payload phase (scan --invisible-crops), ~0.2 s more CPU per 512 px image. Unset for "
    "the server's default (/healthz: checks.invisible_crops)."))]


@router.post("/scan", response_model=ScanRecordOut, response_model_exclude_unset=True, responses={
    413: {"model": ErrorResponse, "description": "file over the upload limit, or more pixels than allowed (bomb)"},
    415: {"model": ErrorResponse, "description": "not a decodable image"},
    409: {"model": ErrorResponse, "description": "visible_thorough (invisible_crops) set on a server without the "
                                                 "visible (invisible) check"}})
async def scan(state: ReadyDep, file: Annotated[UploadFile, File(description="The image to check.")],
               match_verdicts: MatchVerdicts = False, visible_thorough: VisibleThorough = None,
               centre_view: CentreView = None, invisible_crops: InvisibleCrops = None) -> dict[str, Any]:
    """Scan one image: its best corpus matches, the verdict, and its watermark / C2PA / metadata evidence."""
    name = display_name(file.filename)
    data = await read_upload(file, state.config.max_upload_bytes)
    if data is None:
        raise api_error(413, "too_large", f"{name}: larger than the upload limit of {state.config.max_upload_bytes:,} bytes")
    (record,) = await _scan(state, [(name, data)], visible_thorough, centre_view, invisible_crops)
    if record.verdict == "error":
        await _raise_scan_error(state, name, data, record)
    await _keep(state, [(data, record)])
    return _present(record, state.scanner.options.thresholds, match_verdicts)


@router.post("/scan/batch", response_model=list[ScanRecordOut], response_model_exclude_unset=True, responses={
    400: {"model": ErrorResponse, "description": "no files, or more than the configured maximum"},
    409: {"model": ErrorResponse, "description": "visible_thorough (invisible_crops) set on a server without the "
                                                 "visible (invisible) check"}})
async def scan_batch(state: ReadyDep, files: Annotated[list[UploadFile], File(description="The images to check.")],
                     match_verdicts: MatchVerdicts = False, visible_thorough: VisibleThorough = None,
                     centre_view: CentreView = None, invisible_crops: InvisibleCrops = None) -> list[dict[str, Any]]:
    """Scan several images; records come back in upload order, and a bad file gets an error record
    (verdict "error") while the others are scanned as usual."""
    limit = state.config.max_batch_files
    if not files or len(files) > limit:
        raise api_error(400, "bad_batch", f"send 1 to {limit} files in the `files` field (got {len(files)})")
    out: list[ScanRecord | None] = [None] * len(files)
    pending: list[tuple[int, str, bytes]] = []  # (position, name, bytes) of the files to scan
    for i, f in enumerate(files):
        name = display_name(f.filename, f"upload-{i}")
        data = await read_upload(f, state.config.max_upload_bytes)
        if data is None:
            out[i] = ScanRecord.failed(name, f"{name}: larger than the upload limit of "
                                             f"{state.config.max_upload_bytes:,} bytes")
        else:
            pending.append((i, name, data))
    if pending:
        scanned = await _scan(state, [(name, data) for _, name, data in pending], visible_thorough, centre_view,
                              invisible_crops)
        for (i, _, _), record in zip(pending, scanned):
            out[i] = record
        await _keep(state, [(data, record) for (_, _, data), record in zip(pending, scanned)])
    thresholds = state.scanner.options.thresholds
    return [_present(r, thresholds, match_verdicts) for r in out if r is not None]


async def _scan(state: ServiceState, items: list[tuple[str, bytes]], visible_thorough: bool | None,
                centre_view: bool | None, invisible_crops: bool | None) -> list[ScanRecord]:
    try:
        return await state.scan(items, visible_thorough, centre_view, invisible_crops)
    except VisibleCheckOff as e:
        raise api_error(409, "visible_check_off", str(e)) from None
    except InvisibleCheckOff as e:
        raise api_error(409, "invisible_check_off", str(e)) from None


async def _raise_scan_error(state: ServiceState, name: str, data: bytes, record: ScanRecord) -> None:
    """Turn a failed single scan into its HTTP status: decoding again (only on this error path) gives
    the library's typed exception instead of parsing the record's message."""
    try:
        await run_in_threadpool(decode_image, data, name, state.config.max_pixels)
    except DecompressionBombError as e:
        raise api_error(413, "too_many_pixels", str(e)) from None
    except UnreadableImageError as e:
        raise api_error(415, "not_an_image", str(e)) from None
    raise api_error(500, "scan_failed", record.error or "the scan failed")


async def _keep(state: ServiceState, pairs: list[tuple[bytes, ScanRecord]]) -> None:
    folder = state.config.keep_uploads
    if folder is None:
        return
    for data, record in pairs:
        if record.verdict != "error":
            await run_in_threadpool(keep_upload, folder, data, record)


def _present(record: ScanRecord, thresholds: Thresholds, match_verdicts: bool) -> dict[str, Any]:
    d = record.to_dict()
    if match_verdicts and record.verdict != "error":
        identical = record.extra.get("identical_file")
        for m, md in zip(record.matches, d["matches"]):
            md["verdict"] = match_verdict(m, thresholds, same_bytes=(m.id == identical))
    return d


def match_verdict(m: Match, thresholds: Thresholds, same_bytes: bool = False) -> str:
    """A match's verdict from its own descriptor's score, through the library's decide_verdict."""
    if m.descriptor == "pdq":
        scores = {"pdq_distance": m.distance}
    else:
        scores = {m.descriptor: m.score}
    return decide_verdict(scores, thresholds, same_bytes=same_bytes)
