"""The HTTP API and web page of provenance: `create_app(ServerConfig(...))` returns a FastAPI app."""

from __future__ import annotations

from provenance.api.app import app_from_env, create_app
from provenance.api.config import ServerConfig

__all__ = ["ServerConfig", "app_from_env", "create_app"]
