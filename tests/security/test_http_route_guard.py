"""Adversarial: every state-changing route the API serves refuses a caller without the admin token
on its headers, before its body is parsed — whatever the route, and with or without an admin token
configured. The routes are taken from the served OpenAPI document, so a route added later is covered
without touching this test."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleet_server.api import ApiActions, create_app
from fleet_server.api.guard import STATE_CHANGING_METHODS
from fleet_server.config import GitConfig, HttpConfig, ServerConfig
from fleet_server.metrics import ServerMetrics
from fleet_server.rollouts.runner import RolloutRunner
from fleet_server.store import Store
from tests.support.api_server import serve_app

ADMIN = "admin-secret-token"
# Not JSON: a route that parsed its body before checking the token would answer 400.
GARBAGE = b"{not json at all"


def _state_changing(schema: dict[str, Any]) -> list[tuple[str, str]]:
    return [(method.upper(), re.sub(r"\{[^}]+\}", "r-1", path))
            for path, operations in schema["paths"].items() for method in operations
            if method.upper() in STATE_CHANGING_METHODS]


@pytest.mark.parametrize("admin_configured", [True, False])
def test_every_state_changing_route_refuses_on_headers_before_the_body(tmp_path: Path,
                                                                      admin_configured: bool) -> None:
    token_file = tmp_path / "admin.token"
    token_file.write_text(ADMIN + "\n")
    config = ServerConfig(http=HttpConfig(admin_token_file=token_file if admin_configured else None),
                          git=GitConfig(cache_dir=tmp_path / "cache"))
    store = Store(tmp_path / "fleet.db")
    published: list[Any] = []
    triggered: list[bool] = []
    runner = RolloutRunner(store, lambda *args, **kwargs: published.append(args))
    app = create_app(store, config, ServerMetrics(),
                     actions=ApiActions(trigger_git=lambda: triggered.append(True), rollouts=runner))
    try:
        with serve_app(app) as url:
            routes = _state_changing(httpx.get(url + "/api/v1/openapi.json", timeout=5.0).json())
            assert {path for _, path in routes} >= {"/api/v1/devices", "/api/v1/rollouts",
                                                     "/api/v1/rollouts/r-1/r-1", "/api/v1/hooks/git"}
            for method, path in routes:
                headers = {"Content-Type": "application/json"}
                none = httpx.request(method, url + path, content=GARBAGE, headers=headers, timeout=5.0)
                wrong = httpx.request(method, url + path, content=GARBAGE, timeout=5.0,
                                      headers={**headers, "Authorization": "Bearer wrong"})
                if admin_configured:
                    assert none.status_code == 401, (method, path, none.text)
                    assert none.headers["www-authenticate"] == "Bearer"
                    assert (wrong.status_code, wrong.json()) == (403, {"error": "invalid token"}), path
                else:
                    for answer in (none, wrong):
                        assert answer.status_code == 403, (method, path, answer.text)
                        assert "no admin token is configured" in answer.json()["error"]
    finally:
        store.close()
    assert published == []
    assert triggered == []
