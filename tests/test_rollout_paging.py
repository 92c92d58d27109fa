"""``GET /api/v1/rollouts/{id}`` without the per-device map, the paged
``GET /api/v1/rollouts/{id}/devices`` and ``fleetctl rollout devices``: uvicorn on 127.0.0.1 in front of
the real rollout runner over a real store on each backend (assignments are recorded where the runner
would publish them)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from edge_core.messages import event_message, online_message, status_message
from fleet_server import fleetctl
from fleet_server.api import ApiActions, create_app
from fleet_server.api.routes_rollouts import DEFAULT_DEVICE_PAGE, MAX_DEVICE_PAGE
from fleet_server.config import HttpConfig, ServerConfig, StoreConfig
from fleet_server.metrics import ServerMetrics
from fleet_server.rollouts.runner import RolloutRunner
from fleet_server.store import FleetStore, IngestBatch, open_store
from tests.support.api_server import serve_app

READER = "paging-read-token"
OLD_COMMIT, NEW_COMMIT = "a" * 40, "b" * 40
DEVICES = [f"dev-{i:03d}" for i in range(150)]
CANARIES = DEVICES[:5]
PLAN = {"name": "two-waves", "waves": [{"name": "canary", "soak": 0},
                                       {"name": "fleet", "percent": 100, "soak": 0}]}


@dataclass
class Site:
    url: str
    store: FleetStore
    runner: RolloutRunner
    rollout_id: str
    token_file: Path

    def get(self, path: str, **params: object) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", params=params,  # type: ignore[arg-type]
                         headers={"Authorization": f"Bearer {READER}"}, timeout=10.0)


@contextmanager
def serving(tmp_path: Path, store_config: StoreConfig) -> Iterator[Site]:
    """150 online devices on release 1 (5 canaries), a rollout of release 2 started and ticked once."""
    store = open_store(store_config)
    now = time.time()
    batch = IngestBatch()
    for device in DEVICES:
        store.register_device(device, labels={"canary": "true"} if device in CANARIES else {}, now=now - 60)
        batch.add("status", status_message(device, commit=OLD_COMMIT, release=1, sync_state="in_sync",
                                           drift={}, paused=False, ts=now - 30), now - 30)
        batch.add("online", online_message(device, True, now - 30), now - 30)
    store.apply_batch(batch)
    store.record_release(1, OLD_COMMIT, ["ed25519:key"], now - 100)
    store.record_release(2, NEW_COMMIT, ["ed25519:key"], now - 50)
    runner = RolloutRunner(store, lambda *_args: None)
    runner.load()
    rollout_id = runner.start(2, runner.resolve_plan(PLAN, None), actor="alice", reason="release 2")
    runner.tick()
    read = tmp_path / "read.token"
    read.write_text(READER + "\n")
    read.chmod(0o600)
    config = ServerConfig(http=HttpConfig(read_token_file=read))
    app = create_app(store, config, ServerMetrics(), actions=ApiActions(rollouts=runner))
    try:
        with serve_app(app) as url:
            yield Site(url, store, runner, rollout_id, read)
    finally:
        store.close()


@pytest.fixture
def site(tmp_path: Path, store_config: StoreConfig) -> Iterator[Site]:
    """The served rollout of :func:`serving` for one test, on each store backend."""
    with serving(tmp_path, store_config) as served:
        yield served


@pytest.fixture(scope="module")
def read_only_site(tmp_path_factory: pytest.TempPathFactory,
                   new_store: Callable[[], StoreConfig]) -> Iterator[Site]:
    """One served rollout per backend, shared by the tests that only read and are refused."""
    with serving(tmp_path_factory.mktemp("paging"), new_store()) as served:
        yield served


def test_rollout_summary_has_wave_counts_and_no_device_map(site: Site) -> None:
    detail = site.get(f"/api/v1/rollouts/{site.rollout_id}").json()
    assert "devices" not in detail
    assert detail["device_count"] == len(DEVICES)
    assert [w["devices"] for w in detail["waves"]] == [len(CANARIES), len(DEVICES) - len(CANARIES)]
    assert detail["phase"] == "running"
    assert detail["audit"]
    assert "gates" in detail
    assert "samples" in detail


def test_device_listing_pages_in_id_order_with_the_total(site: Site) -> None:
    path = f"/api/v1/rollouts/{site.rollout_id}/devices"
    first = site.get(path).json()
    assert first["limit"] == DEFAULT_DEVICE_PAGE
    assert first["total"] == len(DEVICES)
    assert [d["id"] for d in first["devices"]] == DEVICES[:DEFAULT_DEVICE_PAGE]
    rest = site.get(path, offset=DEFAULT_DEVICE_PAGE, limit=MAX_DEVICE_PAGE).json()
    assert [d["id"] for d in rest["devices"]] == DEVICES[DEFAULT_DEVICE_PAGE:]
    assert rest["total"] == len(DEVICES)
    past = site.get(path, offset=10_000).json()
    assert past["devices"] == []
    assert past["total"] == len(DEVICES)
    one = first["devices"][0]
    assert set(one) == {"id", "wave", "state", "reason", "online", "target", "version"}


def test_device_listing_filters_by_wave_and_state(site: Site) -> None:
    path = f"/api/v1/rollouts/{site.rollout_id}/devices"
    canary = site.get(path, wave=0).json()
    assert [d["id"] for d in canary["devices"]] == CANARIES
    assert {d["state"] for d in canary["devices"]} == {"assigned"}
    assigned = site.get(path, state="assigned", limit=2).json()
    assert assigned["total"] == len(CANARIES)
    assert [d["id"] for d in assigned["devices"]] == CANARIES[:2]
    fleet_pending = site.get(path, wave=1, state="pending").json()
    assert fleet_pending["total"] == len(DEVICES) - len(CANARIES)
    assert site.get(path, wave=1, state="assigned").json() == {
        "id": site.rollout_id, "wave": 1, "state": "assigned", "offset": 0, "limit": DEFAULT_DEVICE_PAGE,
        "total": 0, "devices": []}


def test_device_listing_follows_reports(site: Site) -> None:
    now = time.time()
    batch = IngestBatch()
    batch.add("events", event_message(CANARIES[0], type="sync_succeeded", commit=NEW_COMMIT, release=2,
                                      ts=now), now)
    batch.add("events", event_message(CANARIES[1], type="sync_failed", commit=NEW_COMMIT, release=2, ts=now,
                                      reason="health check failed"), now)
    site.store.apply_batch(batch)
    site.runner.tick()
    path = f"/api/v1/rollouts/{site.rollout_id}/devices"
    assert [d["id"] for d in site.get(path, state="applied").json()["devices"]] == [CANARIES[0]]
    failed = site.get(path, state="failed").json()["devices"]
    assert [d["id"] for d in failed] == [CANARIES[1]]
    assert failed[0]["reason"]


@pytest.mark.parametrize(("params", "status"), [
    ({"limit": MAX_DEVICE_PAGE + 1}, 400), ({"limit": 0}, 400), ({"offset": -1}, 400), ({"wave": -1}, 400),
    ({"state": "exploded"}, 400), ({"wave": "x"}, 400)])
def test_device_listing_refuses_bad_queries(read_only_site: Site, params: dict[str, object],
                                            status: int) -> None:
    site = read_only_site
    answer = site.get(f"/api/v1/rollouts/{site.rollout_id}/devices", **params)
    assert answer.status_code == status
    assert answer.json()["error"]


def test_device_listing_needs_the_read_token_and_a_known_rollout(read_only_site: Site) -> None:
    site = read_only_site
    path = f"/api/v1/rollouts/{site.rollout_id}/devices"
    assert httpx.get(f"{site.url}{path}", timeout=10.0).status_code == 401
    assert site.get("/api/v1/rollouts/no-such-rollout/devices").status_code == 404
    assert site.get("/api/v1/rollouts/bad%20id/devices").status_code == 400


def test_fleetctl_rollout_devices_and_status(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--server", site.url, "--token-file", str(site.token_file)]
    capsys.readouterr()
    assert fleetctl.main(["rollout", "devices", site.rollout_id, "--wave", "1", "--limit", "2", *common]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["DEVICE", "WAVE", "STATE", "ONLINE", "TARGET", "VERSION", "REASON"]
    assert [line.split()[0] for line in out.splitlines()[1:3]] == CANARIES[:2]
    assert out.splitlines()[-1] == f"devices 1-2 of {len(CANARIES)}"
    assert fleetctl.main(["rollout", "devices", site.rollout_id, "--state", "pending", "--offset", "140",
                          *common]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"devices 141-145 of {len(DEVICES) - len(CANARIES)}"
    assert fleetctl.main(["rollout", "status", site.rollout_id, *common]) == 0
    status = capsys.readouterr().out
    assert f"{len(DEVICES)} device(s): fleetctl rollout devices {site.rollout_id} lists them" in status
    assert fleetctl.main(["rollout", "devices", site.rollout_id, "--state", "exploded", *common]) == 1
    assert "state must be one of" in capsys.readouterr().err


def test_reads_answer_while_a_tick_holds_the_runner(site: Site) -> None:
    path = f"/api/v1/rollouts/{site.rollout_id}"
    before = site.get(path).json()
    held, release = threading.Event(), threading.Event()

    def long_tick() -> None:  # what a tick over a large fleet does: hold the runner's lock for seconds
        with site.runner._lock:
            held.set()
            release.wait(30.0)

    ticker = threading.Thread(target=long_tick, daemon=True)
    ticker.start()
    try:
        assert held.wait(5.0)
        during = httpx.get(f"{site.url}{path}", headers={"Authorization": f"Bearer {READER}"}, timeout=5.0)
        assert during.status_code == 200
        assert during.json()["waves"] == before["waves"]
        page = httpx.get(f"{site.url}{path}/devices", params={"limit": 3},
                         headers={"Authorization": f"Bearer {READER}"}, timeout=5.0)
        assert [d["id"] for d in page.json()["devices"]] == DEVICES[:3]
    finally:
        release.set()
        ticker.join(10.0)
