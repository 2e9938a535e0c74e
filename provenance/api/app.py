"""The FastAPI application: `create_app(config)` wires state, routes, limits, CORS and the web page."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from provenance import __version__
from provenance.api.config import ServerConfig
from provenance.api.deps import ApiKeyMiddleware, require_api_key
from provenance.api.errors import install_error_handlers
from provenance.api.limits import BodyGuardMiddleware, BodyRules, RateLimitMiddleware, ScanSlotsMiddleware, TokenBuckets
from provenance.api.methods import HeadOptionsMiddleware
from provenance.api.privacy import install_log_redaction
from provenance.api.routes import health, index, items, optout, page, scan, search
from provenance.api.schemas import ErrorResponse
from provenance.api.state import ServiceState

logger = logging.getLogger(__name__)

SMALL_BODY_LIMIT = 64 * 1024  # bodies of routes that take no upload (GET, JSON search)

DESCRIPTION = """Find the training images an image copies, and the provenance marks it carries.

Every error is `{"error": {"code": ..., "message": ...}}`. When the server has API keys
(`PROVENANCE_API_KEYS`), `/v1` needs `Authorization: Bearer KEY` or `X-API-Key: KEY`.
Keys carry scopes (`KEY:read`, `KEY:optout:write`, `KEY:admin`; a plain `KEY` reads only): registering and
removing opt-outs needs `optout:write` (removing another key's opt-out needs `admin`); without keys, writes are
refused unless the server was started with `--allow-anonymous-writes`.
The web page is at `/`."""


def create_app(config: ServerConfig) -> FastAPI:
    """A ready-to-serve app; the index and models load in the background once the server starts."""
    # Concurrent requests share the cores: ONNX Runtime's busy-waiting threads would steal them (see sscd.py).
    os.environ.setdefault("PROVENANCE_ORT_SPINNING", "0")
    state = ServiceState(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # the secrets, not "KEY:scope" entries; now: uvicorn has set up its loggers by the time the app starts
        install_log_redaction(tuple(config.key_scopes))
        state.start()
        try:
            yield
        finally:
            state.close()

    # /docs is served from the package's own copy of Swagger UI (FastAPI's default loads it from a CDN, which a
    # laptop offline or a locked-down server cannot reach); ReDoc has no local copy, so it is off.
    app = FastAPI(
        title="provenance",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = state
    install_error_handlers(app)

    # 1. Routes: health and the page are open; /v1 is behind the optional API key.
    v1 = APIRouter(
        prefix="/v1",
        dependencies=[Depends(require_api_key)],
        responses={
            400: {"model": ErrorResponse, "description": "bad parameters"},
            401: {"model": ErrorResponse, "description": "missing or wrong API key (when keys are configured)"},
            503: {"model": ErrorResponse, "description": "still loading, or the index failed to load"},
        },
    )
    for module in (index, scan, search, items, optout):
        v1.include_router(module.router)
    app.include_router(health.router)
    app.include_router(v1)
    app.include_router(page.router)
    app.mount("/static", StaticFiles(directory=page.STATIC_DIR), name="static")

    @app.get("/docs", include_in_schema=False, response_class=HTMLResponse)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title="provenance API",
            swagger_js_url="/static/swagger/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger/swagger-ui.css",
            swagger_favicon_url="/static/swagger/favicon-32x32.png",
        )

    # 2. Middleware (the last added runs first), from the outside in: CORS (so every refusal carries its headers),
    #    HEAD/OPTIONS, the key check (before any byte of the body is read), rate limits (only valid keys get a
    #    bucket), the bound on scans in progress, then the body's size, read deadlines and multipart rules.
    app.add_middleware(
        BodyGuardMiddleware,
        rules_for=_body_rules(config),
        idle_timeout_s=config.body_idle_timeout_s,
        total_timeout_s=config.body_timeout_s,
    )
    app.add_middleware(
        ScanSlotsMiddleware, paths=SCAN_PATHS, slots=config.max_active_scans, retry_after_s=config.retry_after_s
    )
    app.add_middleware(
        RateLimitMiddleware,
        per_client=_buckets(config.client_rate_per_minute, config.client_burst),
        per_key=_buckets(config.key_rate_per_minute, config.key_burst) if config.api_keys else None,
    )
    if config.api_keys:  # outside the body limit: a request without a key is refused before any byte is read
        app.add_middleware(ApiKeyMiddleware, keys=tuple(config.key_scopes))
    app.add_middleware(HeadOptionsMiddleware, router=app.router)
    if config.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
            max_age=600,
        )
    return app


# the requests that decode and embed (an opt-out by image too)
SCAN_PATHS = frozenset({"/v1/scan", "/v1/scan/batch", "/v1/search/image", "/v1/optout", "/v1/optout/preview"})
# POST /v1/consent/check: up to 10,000 URLs of up to 2,048 characters, as JSON
CONSENT_CHECK_BYTES = 10_000 * 2_060 + SMALL_BODY_LIMIT


def _body_rules(config: ServerConfig) -> Callable[[str], BodyRules]:
    single = BodyRules(config.max_request_bytes, max_files=1, files_field="file")
    batch = BodyRules(
        config.max_batch_request_bytes,
        max_files=config.max_batch_files,
        files_field="files",
        max_pixels=config.max_batch_pixels,
        max_image_pixels=config.scan.max_pixels,
    )
    small = BodyRules(SMALL_BODY_LIMIT)
    consent = BodyRules(CONSENT_CHECK_BYTES)

    def rules_for(path: str) -> BodyRules:
        if path == "/v1/scan/batch":
            return batch
        if path in SCAN_PATHS:
            return single
        if path == "/v1/consent/check":
            return consent
        return small

    return rules_for


def _buckets(per_minute: float, burst: int) -> TokenBuckets | None:
    return TokenBuckets(per_minute / 60.0, burst) if per_minute > 0 else None


def app_from_env() -> FastAPI:
    """App factory for `uvicorn --factory provenance.api.app:app_from_env` (several workers): config from PROVENANCE_*."""
    return create_app(ServerConfig.from_env())
