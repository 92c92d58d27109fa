"""Enrolment: ``POST /api/v1/devices`` and ``fleetctl enroll``, against a real API server on loopback,
and an enrolled device heard by a real ingest under ``unknown_devices: refuse`` through Mosquitto; on
each store backend."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge_core import messages as m
from fleet_server import fleetctl
from fleet_server.api.app import ApiActions, create_app
from fleet_server.config import StoreConfig
from fleet_server.metrics import ServerMetrics
from tests.support.api_server import ADMIN, READER, Api, running_api, serve_app
from tests.support.broker import Mosquitto
from tests.support.ingest_world import Publisher, Server, make_config
from tests.support.wait import wait_until

_ENROLL = "/api/v1/devices"


@pytest.fixture
def api(tmp_path: Path, store_config: StoreConfig) -> Iterator[Api]:
    """The API over a filled store, on each backend."""
    with running_api(tmp_path, read=True, store_config=store_config) as running:
        yield running


@pytest.fixture
def sqlite_api(tmp_path: Path) -> Iterator[Api]:
    """The API over a filled SQLite store, for requests refused before any store is reached."""
    with running_api(tmp_path, read=True) as running:
        yield running


@pytest.fixture(scope="module")
def refusing_api(new_store: Callable[[], StoreConfig],
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One API over a filled store per backend, shared by the refused enrolments: each stores nothing."""
    with running_api(tmp_path_factory.mktemp("refusing-api"), read=True, store_config=new_store()) as running:
        yield running


def enroll(api: Api, body: Any, token: str | None = ADMIN, actor: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if actor:
        headers["X-Actor"] = actor
    return httpx.post(api.url + _ENROLL, json=body, headers=headers, timeout=5.0)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run fleetctl in-process; return (exit code, stdout, stderr)."""
    code = fleetctl.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_enroll_creates_then_updates_and_audits(api: Api) -> None:
    response = enroll(api, {"id": "gw-berlin-0042", "labels": {"site": "berlin", "ring": "canary"},
                            "profile": "gateway", "reason": "new  site\nrollout"}, actor="alice")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["created"] is True
    assert body["device"]["labels"] == {"site": "berlin", "ring": "canary"}
    assert body["device"]["profile"] == "gateway"
    assert api.store.known_device("gw-berlin-0042")
    listed = api.get("/api/v1/devices", token=READER, label="ring:canary").json()["devices"]
    assert "gw-berlin-0042" in [d["id"] for d in listed]

    again = enroll(api, {"id": "gw-berlin-0042", "profile": "generic-linux"})
    assert again.status_code == 200, again.text
    assert again.json()["created"] is False
    device = api.store.device("gw-berlin-0042")
    assert device is not None
    assert device["profile"] == "generic-linux"
    assert device["labels"] == {"site": "berlin", "ring": "canary"}  # not given: left as it was

    entries = [e for e in api.store.audit(limit=10) if e["action"] == "device.enroll"]
    assert [(e["actor"], e["target"]) for e in entries] == [("admin", "gw-berlin-0042"),
                                                            ("alice", "gw-berlin-0042")]
    assert entries[1]["reason"] == "new site rollout"


def test_enroll_needs_the_admin_token(api: Api) -> None:
    assert enroll(api, {"id": "dev-1"}, token=None).status_code == 401
    assert enroll(api, {"id": "dev-1"}, token=READER).status_code == 403
    assert enroll(api, {"id": "dev-1"}, token="wrong").status_code == 403
    assert not api.store.known_device("dev-1")


@pytest.mark.parametrize(("body", "reason"), [
    ({}, "id is required"),
    ({"id": "a/b"}, "id must be a device id"),
    ({"id": "x" * 65}, "id must be a device id"),
    ({"id": 7}, "id must be a device id"),
    ({"id": "dev-1", "colour": "blue"}, "unknown field(s): colour"),
    ({"id": "dev-1", "labels": ["site"]}, "labels must be a mapping"),
    ({"id": "dev-1", "labels": {f"k{i}": "v" for i in range(65)}}, "labels must be a mapping"),
    ({"id": "dev-1", "labels": {"bad key": "v"}}, "labels: invalid label name"),
    ({"id": "dev-1", "labels": {"site": 5}}, "labels.site: value must be text"),
    ({"id": "dev-1", "labels": {"site": "v" * 257}}, "labels.site: value must be text"),
    ({"id": "dev-1", "profile": "../etc"}, "profile must be a profile name"),
    ({"id": "dev-1", "reason": "r" * 1001}, "reason must be text"),
])
def test_bad_enrolments_are_refused_with_a_reason(refusing_api: Api, body: dict[str, Any],
                                                  reason: str) -> None:
    response = enroll(refusing_api, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(reason), response.json()
    assert not refusing_api.store.known_device("dev-1")


def test_a_body_that_is_not_an_object_is_refused(sqlite_api: Api) -> None:
    headers = {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"}
    for raw in (b"[]", b"not json", b""):
        response = httpx.post(sqlite_api.url + _ENROLL, content=raw, timeout=5.0, headers=headers)
        assert response.status_code == 400, (raw, response.text)


def test_fleetctl_enroll(api: Api, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    token = tmp_path / "admin.token"
    token.write_text(ADMIN + "\n")
    code, out, err = run(capsys, "enroll", "cam-07", "--label", "site=north", "--label", "ring=canary",
                         "--profile", "gateway", "--reason", "spare camera", "--actor", "bob",
                         "--server", api.url, "--token-file", str(token))
    assert (code, err) == (0, "")
    assert out == "cam-07: enrolled (ring=canary, site=north; profile gateway)\n"
    code, out, _ = run(capsys, "enroll", "cam-07", "--server", api.url, "--token-file", str(token), "--json")
    assert code == 0
    assert json.loads(out)["created"] is False
    actors = [(e["actor"], e["reason"]) for e in api.store.audit(limit=10) if e["action"] == "device.enroll"]
    assert actors[-1] == ("bob", "spare camera")

    reader = tmp_path / "read.token"
    reader.write_text(READER + "\n")
    code, _, err = run(capsys, "enroll", "cam-08", "--server", api.url, "--token-file", str(reader))
    assert code == 1
    assert err == "fleetctl: fleet server answered 403: invalid token\n"
    code, _, err = run(capsys, "enroll", "cam-08", "--label", "site", "--server", api.url)
    assert (code, err) == (1, "fleetctl: --label must be KEY=VALUE, got 'site'\n")
    code, _, err = run(capsys, "enroll", "bad/id", "--server", api.url, "--token-file", str(token))
    assert code == 1
    assert err.startswith("fleetctl: fleet server answered 400: id must be a device id")
    assert not api.store.known_device("cam-08")


def test_an_enrolled_device_is_heard_under_the_refuse_policy(tmp_path: Path, broker: Mosquitto,
                                                             store_config: StoreConfig,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    config = make_config(tmp_path, broker.port, store=store_config, ingest={"unknown_devices": "refuse"},
                         http={"admin_token_file": str(tmp_path / "admin.token")})
    (tmp_path / "admin.token").write_text(ADMIN + "\n")
    (tmp_path / "admin.token").chmod(0o600)
    server = Server(config)
    publisher: Publisher | None = None
    try:
        server.start()
        app = create_app(server.store, config, ServerMetrics(), actions=ApiActions())
        publisher = Publisher(broker.port, "enroll-test-publisher")
        with serve_app(app) as url:
            code, _, err = run(capsys, "enroll", "gw-new", "--label", "ring=canary", "--server", url,
                               "--token-file", str(tmp_path / "admin.token"))
            assert (code, err) == (0, "")
            now = time.time()
            for dev in ("gw-new", "stranger"):
                publisher.send(f"fleet/v1/{dev}/online", m.encode(m.online_message(dev, True, now)))
            publisher.flush()
            wait_until(lambda: (server.store.device("gw-new") or {}).get("online") is True, "gw-new online")
            wait_until(lambda: server.dropped("unknown_device") == 1, "1 unknown-device drop")
            assert not server.store.known_device("stranger")
            assert (server.store.device("gw-new") or {}).get("labels") == {"ring": "canary"}
    finally:
        if publisher is not None:
            publisher.close()
        server.stop()
