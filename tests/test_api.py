"""The HTTP API, served for real by uvicorn on 127.0.0.1, over a real SQLite store."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleet_server.api import ApiActions, create_app
from fleet_server.config import HttpConfig, ServerConfig, StoreConfig
from fleet_server.errors import ServerConfigError
from fleet_server.metrics import ServerMetrics
from fleet_server.store import Store
from tests.support.api_server import (
    ADMIN,
    COMMIT,
    HOOK_SECRET,
    NOW,
    READER,
    Api,
    running_api,
)


@pytest.fixture
def api(tmp_path: Path, store_config: StoreConfig) -> Iterator[Api]:
    """The API over a filled store, on each backend."""
    with running_api(tmp_path, store_config=store_config) as running:
        yield running


@pytest.fixture
def guarded_api(tmp_path: Path) -> Iterator[Api]:
    with running_api(tmp_path, read=True) as running:
        yield running


def _ids(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [d["id"] for d in response.json()["devices"]]


# --- reads and filters -------------------------------------------------------------------------------


def test_devices_lists_every_device_in_id_order(api: Api) -> None:
    response = api.get("/api/v1/devices")
    assert _ids(response) == ["cam-01", "cam-02", "gw-01", "gw-02"]
    body = response.json()
    assert (body["total"], body["limit"], body["offset"]) == (4, 100, 0)
    cam = body["devices"][0]
    assert cam["labels"] == {"ring": "canary", "site": "north"}
    assert (cam["sync_state"], cam["online"], cam["release"]) == ("in_sync", True, 4)


def test_device_filters_combine(api: Api) -> None:
    assert _ids(api.get("/api/v1/devices", label="ring:canary")) == ["cam-01", "gw-01"]
    assert _ids(api.get("/api/v1/devices", label=["ring:canary", "site:south"])) == ["gw-01"]
    assert _ids(api.get("/api/v1/devices", sync_state="failed")) == ["cam-02"]
    assert _ids(api.get("/api/v1/devices", online="true")) == ["cam-01"]
    assert _ids(api.get("/api/v1/devices", online="false")) == ["cam-02", "gw-01", "gw-02"]
    assert _ids(api.get("/api/v1/devices", label="site:nowhere")) == []
    # key=value, as fleetctl and the dashboard write it, is the same filter
    assert _ids(api.get("/api/v1/devices", label=["ring=canary", "site=south"])) == ["gw-01"]
    assert _ids(api.get("/api/v1/devices", label=["ring=canary", "site:south"])) == ["gw-01"]
    refused = api.get("/api/v1/devices", label="site")
    assert refused.status_code == 400
    assert "key=value" in refused.json()["error"]
    page = api.get("/api/v1/devices", limit=2, offset=1)
    assert _ids(page) == ["cam-02", "gw-01"]
    assert page.json()["total"] == 4


def test_one_device_has_events_and_health(api: Api) -> None:
    response = api.get("/api/v1/devices/cam-01")
    assert response.status_code == 200
    body = response.json()
    assert body["device"]["id"] == "cam-01"
    assert [e["type"] for e in body["events"]] == ["sync_succeeded"]
    assert body["events"][0]["committed_at"] == pytest.approx(NOW - 600)
    assert body["health"][0]["metrics"] == {"cpu_percent": 12.5}


def test_summary_releases_and_audit(api: Api) -> None:
    summary = api.get("/api/v1/summary").json()
    assert summary["devices"] == 4
    assert summary["online"] == 1
    assert summary["by_sync_state"]["in_sync"] == 2
    releases = api.get("/api/v1/releases").json()["releases"]
    assert [(r["version"], r["commit"]) for r in releases] == [(4, COMMIT)]
    audit = api.get("/api/v1/audit").json()["audit"]
    assert [(a["actor"], a["action"], a["reason"]) for a in audit] == [
        ("alice", "rollout.pause", "looking at canary metrics")]


BAD_INPUTS: list[tuple[str, dict[str, Any]]] = [
    ("/api/v1/devices", {"limit": "abc"}),
    ("/api/v1/devices", {"limit": "0"}),
    ("/api/v1/devices", {"limit": "100000"}),
    ("/api/v1/devices", {"offset": "-1"}),
    ("/api/v1/devices", {"online": "maybe"}),
    ("/api/v1/devices", {"label": "no-colon"}),
    ("/api/v1/devices", {"label": ":empty-key"}),
    ("/api/v1/devices", {"label": ["a:1", "a:2"]}),
    ("/api/v1/devices", {"label": ["a=1", "a:2"]}),
    ("/api/v1/devices", {"label": "=empty-key"}),
    ("/api/v1/devices", {"label": "empty-value="}),
    ("/api/v1/devices", {"sync_state": "NOT A STATE"}),
    ("/api/v1/devices", {"sync_state": "x" * 100}),
    ("/api/v1/releases", {"limit": "1e9"}),
    ("/api/v1/audit", {"limit": "-5"}),
    ("/api/v1/devices/bad%20id%21", {}),
    ("/api/v1/devices/" + "d" * 200, {}),
]


def test_bad_input_is_a_400_with_a_reason(api: Api) -> None:
    # One server for every case (starting uvicorn per case would dominate the run time).
    answers = {(path, repr(params)): api.get(path, **params) for path, params in BAD_INPUTS}
    wrong = {case: r.status_code for case, r in answers.items() if r.status_code != 400}
    assert wrong == {}
    for response in answers.values():
        reason = response.json()["error"]
        assert isinstance(reason, str)
        assert reason
        assert "\n" not in reason


def test_not_found_is_json(api: Api) -> None:
    missing = api.get("/api/v1/devices/nope-01")
    assert missing.status_code == 404
    assert missing.json() == {"error": "no device nope-01"}
    route = api.get("/api/v2/devices")
    assert route.status_code == 404
    assert route.json() == {"error": "not found"}
    wrong_method = httpx.delete(api.url + "/api/v1/devices", timeout=5.0)
    assert wrong_method.status_code == 405
    assert "error" in wrong_method.json()


def test_health_and_openapi(api: Api) -> None:
    assert api.get("/healthz").json() == {"status": "ok", "store": api.store.backend}
    schema = api.get("/api/v1/openapi.json").json()
    assert "/api/v1/devices" in schema["paths"]
    assert "/api/v1/hooks/git" in schema["paths"]


def test_store_failure_is_a_503_not_a_500(api: Api) -> None:
    api.store.close()
    response = api.get("/api/v1/summary")
    assert response.status_code == 503
    assert response.json() == {"error": "the fleet database is unavailable"}


# --- authentication ----------------------------------------------------------------------------------


def test_reads_need_the_read_token_when_configured(guarded_api: Api) -> None:
    none = guarded_api.get("/api/v1/devices")
    assert none.status_code == 401
    assert none.headers["www-authenticate"] == "Bearer"
    assert none.json() == {"error": "read token required"}
    wrong = guarded_api.get("/api/v1/devices", token="not-the-token")
    assert wrong.status_code == 403
    assert wrong.json() == {"error": "invalid token"}
    assert guarded_api.get("/api/v1/devices", token=READER).status_code == 200
    assert guarded_api.get("/api/v1/devices", token=ADMIN).status_code == 200
    assert guarded_api.get("/api/v1/devices/cam-01").status_code == 401
    assert guarded_api.get("/metrics").status_code == 401
    assert guarded_api.get("/metrics", token=READER).status_code == 200
    assert guarded_api.get("/healthz").status_code == 200


def test_reads_are_open_without_a_read_token(api: Api) -> None:
    assert api.get("/api/v1/summary").status_code == 200
    assert api.get("/api/v1/summary", token="anything").status_code == 200


def test_webhook_with_admin_token_triggers_the_watcher(api: Api) -> None:
    none = httpx.post(api.url + "/api/v1/hooks/git", timeout=5.0)
    assert none.status_code == 401
    wrong = api.hook(b"{}", {"Authorization": "Bearer wrong"})
    assert wrong.status_code == 403
    assert api.triggered == []
    ok = api.hook(b"{}", {"Authorization": f"Bearer {ADMIN}"})
    assert ok.status_code == 202
    assert ok.json() == {"triggered": True}
    assert len(api.triggered) == 1
    entry = api.store.audit(limit=1)[0]
    assert (entry["actor"], entry["action"], entry["target"]) == ("admin", "git.poll", "git://127.0.0.1/fleet.git")


def test_webhook_hmac_is_verified(api: Api) -> None:
    body = b'{"ref": "refs/heads/main"}'
    good = "sha256=" + hmac.new(HOOK_SECRET, body, hashlib.sha256).hexdigest()
    assert api.hook(body, {"X-Hub-Signature-256": good}).status_code == 202
    assert api.store.audit(limit=1)[0]["actor"] == "webhook"
    bad = "sha256=" + hmac.new(b"other secret", body, hashlib.sha256).hexdigest()
    assert api.hook(body, {"X-Hub-Signature-256": bad}).status_code == 403
    assert api.hook(body + b" ", {"X-Hub-Signature-256": good}).status_code == 403
    assert api.hook(body, {"X-Hub-Signature-256": "sha1=abc"}).status_code == 403
    assert len(api.triggered) == 1


def test_webhook_body_is_capped(api: Api) -> None:
    response = api.hook(b"x" * (1024 * 1024 + 1), {"Authorization": f"Bearer {ADMIN}"})
    assert response.status_code == 413
    assert api.triggered == []


def test_state_changes_are_refused_without_an_admin_token_file(tmp_path: Path) -> None:
    with running_api(tmp_path, admin=False, hook=False) as api:
        response = api.hook(b"{}", {"Authorization": f"Bearer {ADMIN}"})
        assert response.status_code == 403
        assert "no admin token" in response.json()["error"]
        assert api.hook(b"{}", {"X-Hub-Signature-256": "sha256=00"}).status_code == 403
        assert api.triggered == []


def test_webhook_without_a_watcher_is_503(tmp_path: Path) -> None:
    with running_api(tmp_path, with_trigger=False) as api:
        response = api.hook(b"{}", {"Authorization": f"Bearer {ADMIN}"})
        assert response.status_code == 503


def test_unreadable_token_file_is_a_config_error(tmp_path: Path) -> None:
    store = Store(tmp_path / "fleet.db")
    try:
        config = ServerConfig(http=HttpConfig(admin_token_file=tmp_path / "missing.token"))
        with pytest.raises(ServerConfigError, match=r"http\.admin_token_file"):
            create_app(store, config, ServerMetrics(), actions=ApiActions())
        (tmp_path / "empty.token").write_text("  \n")
        config = ServerConfig(http=HttpConfig(read_token_file=tmp_path / "empty.token"))
        with pytest.raises(ServerConfigError, match="empty"):
            create_app(store, config, ServerMetrics(), actions=ApiActions())
    finally:
        store.close()


# --- metrics -----------------------------------------------------------------------------------------


def test_metrics_exposition_parses(api: Api) -> None:
    api.metrics.ingest.dropped("spoofed", 3)
    response = api.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    dropped = {s.labels["reason"]: s.value for s in families["fleet_messages_dropped"].samples
               if s.name.endswith("_total")}
    assert dropped["spoofed"] == 3
    devices = {s.labels["sync_state"]: s.value for s in families["fleet_devices"].samples}
    assert devices == {"in_sync": 2, "failed": 1, "unknown": 1}
    assert families["fleet_sync_success_ratio"].samples[0].value == 1.0
    applied = {s.name: s.value for s in families["fleet_commit_to_applied_seconds"].samples}
    assert applied["fleet_commit_to_applied_seconds_count"] == 1
    assert applied["fleet_commit_to_applied_seconds_sum"] == pytest.approx(545.0, abs=0.01)


def test_module_exports_are_pinned() -> None:
    from fleet_server import api  # noqa: PLC0415
    from fleet_server.api import auth, routes_fleet  # noqa: PLC0415

    assert sorted(api.__all__) == ["ApiActions", "ApiStore", "create_app"]
    assert sorted(auth.__all__) == ["MAX_SECRET_BYTES", "Tokens", "admin_access", "bearer_scheme",
                                    "bearer_token", "load_secret", "load_tokens", "read_access",
                                    "require_admin", "require_read", "signature_valid"]
    assert sorted(routes_fleet.__all__) == ["FleetReader", "checked_device_id", "fleet_router",
                                            "parse_label_filters"]
