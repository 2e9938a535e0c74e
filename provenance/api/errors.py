"""Error responses: every failure is JSON {"error": {"code", "message"}} with its HTTP status."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

from provenance.errors import ProvenanceError

logger = logging.getLogger(__name__)

# The code clients switch on, per status, when a route gives none of its own.
DEFAULT_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "too_large",
    415: "not_an_image",
    422: "invalid_request",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
}


# The HTTP status of each library error code (provenance.errors: each ProvenanceError subclass's `code`, and a
# scan record's `error_code`); the one table the API maps failures by. A code not here is a 400.
STATUS_BY_CODE = {
    "not_an_image": 415,
    "unreadable": 415,
    "too_many_pixels": 413,
    "too_large": 413,
    "invalid_options": 400,
    "item_not_found": 404,
    "descriptor_unavailable": 409,
    "index_mismatch": 409,
    "index_not_found": 503,
    "index_format": 503,
    "model_load_failed": 503,
    "scan_failed": 500,
    # the limits of provenance.api.limits and of caption queries (provenance.captions)
    "bad_batch": 400,
    "repeated_field": 400,
    "request_timeout": 408,
    "rate_limited": 429,
    "busy": 503,
    "query_too_long": 400,
    "query_timeout": 503,
    # the do-not-train registry (provenance.registry)
    "invalid_optout": 400,
    "optout_not_found": 404,
    "forbidden": 403,
    "domain_proof_failed": 422,
    "registry_unavailable": 503,
}


def status_for(code: str | None) -> int:
    return STATUS_BY_CODE.get(code or "", 400)


def api_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> HTTPException:
    """The HTTPException a route raises; the handler below renders it as the JSON error body."""
    return HTTPException(status_code=status, detail={"code": code, "message": message}, headers=headers)


def error_body(status: int, code: str | None, message: str) -> dict:
    return {"error": {"code": code or DEFAULT_CODES.get(status, "error"), "message": message}}


def _public(request: Request, message: str) -> str:
    # library messages may name server paths (the index folder, a corpus file): never send those
    state = getattr(request.app.state, "service", None)
    return state.redactor.text(message) if state is not None else message


async def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail
    if isinstance(detail, dict) and "code" in detail:
        body = error_body(exc.status_code, detail["code"], _public(request, str(detail.get("message", ""))))
    else:
        body = error_body(exc.status_code, None, _public(request, str(detail)))
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _provenance_error(request: Request, exc: Exception) -> JSONResponse:
    # a library error raised by a route (or rebuilt from a scan record's error_code): status by its code
    code = getattr(exc, "code", "provenance_error")
    status = status_for(code)
    if status >= 500:
        logger.error("%s %s failed: %s", request.method, request.url.path, exc)
    return JSONResponse(error_body(status, code, _public(request, str(exc))), status_code=status)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's 422 becomes a 400 "bad parameters" with one readable line per problem.
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
        problems.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return JSONResponse(
        error_body(400, "invalid_parameters", "; ".join(problems) or "invalid request"), status_code=400
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(error_body(500, "internal_error", f"internal error ({type(exc).__name__})"), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    # Starlette types a handler's exception as plain Exception, not the class it is registered for
    app.add_exception_handler(StarletteHTTPException, _http_exception)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(ProvenanceError, _provenance_error)
    app.add_exception_handler(Exception, _unexpected)


async def send_json(send: Send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    """A whole JSON response from ASGI middleware; the connection closes, since the request body may be unread."""
    payload = json.dumps(body).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items() if k.lower() != "connection"]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
