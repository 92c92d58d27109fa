"""The fleet server's HTTP API (FastAPI): ``create_app(store, config, metrics, actions=...)``."""

from __future__ import annotations

from fleet_server.api.app import ApiActions, ApiStore, create_app

__all__ = ["ApiActions", "ApiStore", "create_app"]
