"""The dashboard's test world: headless Chromium, the app served over a filled store, and a rollout
started by the real runner (shared by the dashboard and console tests)."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright import sync_api as playwright_sync

from edge_core.messages import event_message, health_message, online_message, status_message
from fleet_server.api import ApiActions, create_app
from fleet_server.config import GitConfig, HttpConfig, ServerConfig, StoreConfig
from fleet_server.metrics import ServerMetrics
from fleet_server.remote_pause import RemotePause
from fleet_server.rollouts.runner import RolloutRunner
from fleet_server.store import FleetStore, IngestBatch, open_store
from tests.support.api_server import serve_app as serve

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed"),
    pytest.mark.timeout(120),
]

ADMIN = "dashboard-admin-token"
READER = "dashboard-read-token"
COMMIT = "d" * 40
OLD_COMMIT = "a" * 40
DOCS_IMAGES = Path(__file__).resolve().parents[2] / "docs" / "images"
WAIT_MS = 30_000  # bounded waits for the page; generous for a loaded CI machine

# id, labels, sync state, online, drifted resources
FLEET: tuple[tuple[str, dict[str, str], str, bool, tuple[str, ...]], ...] = (
    ("cam-01", {"site": "north", "canary": "true", "class": "camera"}, "in_sync", True, ()),
    ("cam-02", {"site": "north", "class": "camera"}, "in_sync", True, ()),
    ("cam-03", {"site": "north", "class": "camera"}, "drifted", True, ("file:/etc/motion.conf",)),
    ("cam-04", {"site": "south", "class": "camera"}, "failed", True, ()),
    ("cam-05", {"site": "south", "class": "camera"}, "in_sync", False, ()),
    ("gw-01", {"site": "north", "canary": "true", "class": "gateway"}, "in_sync", True, ()),
    ("gw-02", {"site": "south", "class": "gateway"}, "in_sync", True, ()),
    ("gw-03", {"site": "south", "class": "gateway"}, "rolled_back", False, ()),
    ("sensor-01", {"site": "east", "class": "sensor"}, "in_sync", True, ()),
    ("sensor-02", {"site": "east", "class": "sensor"}, "in_sync", True, ()),
)
HEALTH_STEP = 300.0
HEALTH_SAMPLES = 36  # three hours, one sample every five minutes


def fill_fleet(store: FleetStore) -> None:
    """Register the test fleet and ingest its status, online state, events and health history."""
    now = time.time()  # at fill time, not import time: the suite may run long before this test
    batch = IngestBatch()
    for device, labels, state, online, drifted in FLEET:
        store.register_device(device, labels=labels, profile="rpi4", now=now - 7200)
        drift = {"count": len(drifted), "corrected": False, "resources": list(drifted)}
        failing = state in ("failed", "rolled_back")  # the same failure three syncs in a row
        batch.add("status", status_message(device, commit=COMMIT, release=7, sync_state=state, drift=drift,
                                           paused=False, ts=now - 120, repeat_count=3 if failing else None,
                                           last_seen=now - 121 if failing else None), now - 119)
        batch.add("online", online_message(device, online, now - 100), now - 99)
        batch.add("events", event_message(device, type="sync_started", commit=COMMIT, release=7,
                                          ts=now - 200), now - 199)
        outcome = {"failed": "sync_failed", "rolled_back": "sync_rolled_back"}.get(state, "sync_succeeded")
        batch.add("events", event_message(device, type=outcome, commit=COMMIT, release=7, ts=now - 150,
                                          reason="health check nginx failed" if outcome != "sync_succeeded"
                                          else None), now - 149)
    for i in range(HEALTH_SAMPLES):
        ts = now - (HEALTH_SAMPLES - i) * HEALTH_STEP
        metrics = {"cpu_percent": round(35 + 25 * math.sin(i / 4), 1), "memory_percent": 40 + i * 0.8,
                   "disk": {"/": {"total": 32e9, "free": 12e9, "percent_free": 37.5 - i * 0.2}}}
        batch.add("health", health_message("cam-01", commit=COMMIT, release=7, ts=ts, metrics=metrics,
                                           checks=[{"name": "motion", "ok": True}]), ts + 1)
    batch.add("events", event_message("cam-03", type="drift_detected", commit=COMMIT, release=7, ts=now - 60,
                                      detail={"count": 1, "corrected": False,
                                              "resources": ["file:/etc/motion.conf"], "mode": "audit"}),
              now - 59)
    store.apply_batch(batch)
    store.record_release(6, OLD_COMMIT, ["ed25519:key"], now - 90000, committed_at=now - 90100)
    store.record_release(7, COMMIT, ["ed25519:key"], now - 3000, committed_at=now - 3100)


def server_config(tmp_path: Path, *, read_token: bool = False) -> ServerConfig:
    """A configuration with an admin token (and a read token when asked) in 0600 files."""
    admin = tmp_path / "admin.token"
    admin.write_text(ADMIN + "\n")
    admin.chmod(0o600)
    read = None
    if read_token:
        read = tmp_path / "read.token"
        read.write_text(READER + "\n")
        read.chmod(0o600)
    return ServerConfig(http=HttpConfig(admin_token_file=admin, read_token_file=read),
                        git=GitConfig(url="git://127.0.0.1/fleet.git", cache_dir=tmp_path / "cache"))


@dataclass
class Site:
    """A running fleet server and a browser pointed at it."""

    url: str
    store: FleetStore
    browser: Any
    shots: Path
    console: list[str] = field(default_factory=list)
    opened: list[Any] = field(default_factory=list)
    controls: list[tuple[str, bool, str | None]] = field(default_factory=list)
    """The ``control`` messages the remote pause published (the broker's side is tested elsewhere)."""

    def page(self, path: str, *, token: str | None = None) -> Any:
        """Open ``path`` in a fresh browser context (its own sessionStorage), recording console errors."""
        context = self.browser.new_context(viewport={"width": 1360, "height": 900})
        page = context.new_page()
        page.on("console", lambda msg: self.console.append(f"{msg.type}: {msg.text}") if msg.type == "error"
                else None)
        page.on("pageerror", lambda exc: self.console.append(f"pageerror: {exc}"))
        if token is not None:
            page.add_init_script(f"window.sessionStorage.setItem('edge-fleet.token', {token!r});")
        self.opened.append(page)
        page.goto(self.url + path)
        return page

    def screenshots_on_failure(self, request: pytest.FixtureRequest, failed_before: int) -> None:
        """When the test failed (its count of failures rose), save every page it opened as
        ``shots/failed-<n>.png`` in its temporary directory."""
        if request.session.testsfailed <= failed_before:
            return
        for n, page in enumerate(self.opened):
            with contextlib.suppress(Exception):  # a page already closed has nothing to show
                page.screenshot(path=str(self.shots / f"failed-{n}.png"), full_page=True)

    def screenshot(self, page: Any, name: str) -> Path:
        """Save a full-page screenshot to the temporary directory; copy it to docs/images/ when
        DASHBOARD_SCREENSHOTS=1."""
        target = self.shots / name
        page.screenshot(path=str(target), full_page=True)
        if os.environ.get("DASHBOARD_SCREENSHOTS") == "1":
            DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(target, DOCS_IMAGES / name)
        return target


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium (the system's) for the whole module."""
    with playwright_sync.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def site(tmp_path: Path, browser: Any, request: pytest.FixtureRequest,
         store_config: StoreConfig) -> Iterator[Site]:
    """The fleet server's app over a filled store (each backend), served on loopback; a screenshot
    of every page the test opened is saved in ``shots/`` when it fails."""
    store = open_store(store_config)
    fill_fleet(store)
    controls: list[tuple[str, bool, str | None]] = []
    pauses = RemotePause(store, lambda device, paused, reason: controls.append((device, paused, reason)))
    app = create_app(store, server_config(tmp_path), ServerMetrics(), actions=ApiActions(pauses=pauses))
    shots = tmp_path / "shots"
    shots.mkdir()
    failed_before = request.session.testsfailed
    with serve(app) as url:
        served = Site(url, store, browser, shots, controls=controls)
        yield served
        served.screenshots_on_failure(request, failed_before)
    store.close()



def wait_js(page: Any, expression: str, *, timeout: int = WAIT_MS) -> None:
    """Poll a JavaScript expression in the page until it is true (Playwright's own wait_for_function
    evaluates strings with eval, which the pages' Content-Security-Policy forbids, as it should)."""
    deadline = time.monotonic() + timeout / 1000
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {expression}")
        page.wait_for_timeout(50)


def table_devices(page: Any) -> list[str]:
    """The device ids of the overview table's rows, in order."""
    return list(page.eval_on_selector_all("#device-table tbody tr[data-device]",
                                          "rows => rows.map(r => r.dataset.device)"))


# --- fleet overview --------------------------------------------------------------------------------


NEW_COMMIT = "e" * 40
PLAN = {"name": "canary-then-fleet", "waves": [
    {"name": "canary", "soak": 0, "promotion": "auto"},
    {"name": "fleet", "percent": 100, "soak": 0, "max_failure_rate": 0.5},
]}


@dataclass
class RolloutSite:
    """A fleet server with a rollout runner, one rollout of release 8 started, and a browser."""

    site: Site
    runner: RolloutRunner
    rollout_id: str
    published: list[tuple[str, str, int, str | None]]

    def report(self, outcomes: dict[str, str]) -> None:
        """Ingest one sync outcome event per device for release 8, then let the runner tick."""
        batch = IngestBatch()
        now = time.time()
        for device, outcome in outcomes.items():
            batch.add("events", event_message(device, type=outcome, commit=NEW_COMMIT, release=8, ts=now),
                      now)
        self.site.store.apply_batch(batch)
        self.runner.tick()


@pytest.fixture
def rollout_site(tmp_path: Path, browser: Any, request: pytest.FixtureRequest,
                 store_config: StoreConfig) -> Iterator[RolloutSite]:
    """The app with the real rollout runner over a filled store (each backend), a rollout of release 8
    started; a screenshot of every page the test opened is saved in ``shots/`` when it fails."""
    store = open_store(store_config)
    fill_fleet(store)
    now = time.time()
    store.record_release(8, NEW_COMMIT, ["ed25519:key"], now - 60, committed_at=now - 70)
    published: list[tuple[str, str, int, str | None]] = []

    def publish(device: str, revision: str, release: int, rollout_id: str | None) -> None:
        published.append((device, revision, release, rollout_id))

    runner = RolloutRunner(store, publish)
    runner.load()
    rollout_id = runner.start(8, runner.resolve_plan(PLAN, None), actor="alice", reason="release 8")
    app = create_app(store, server_config(tmp_path), ServerMetrics(), actions=ApiActions(rollouts=runner))
    shots = tmp_path / "shots"
    shots.mkdir()
    failed_before = request.session.testsfailed
    with serve(app) as url:
        served = Site(url, store, browser, shots)
        yield RolloutSite(served, runner, rollout_id, published)
        served.screenshots_on_failure(request, failed_before)
    store.close()


def wave_meta(page: Any, wave: int) -> dict[str, int]:
    """The done/failed/pending/offline counts a wave's section shows."""
    data = page.eval_on_selector(f"section[data-wave='{wave}'] .wave-meta", "n => ({...n.dataset})")
    return {k: int(v) for k, v in data.items()}


def chart_samples(page: Any, wave: int) -> int:
    """How many progress samples a wave's chart is drawn from."""
    return int(page.get_attribute(f"section[data-wave='{wave}']", "data-samples") or 0)
