"""A real fleet API served by uvicorn on a free loopback port over a filled store (either backend)."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from edge_core.messages import event_message, health_message, online_message, status_message
from fleet_server.api import ApiActions, create_app
from fleet_server.config import GitConfig, HttpConfig, ServerConfig, StoreConfig
from fleet_server.ingest import Ingestor
from fleet_server.metrics import ServerMetrics
from fleet_server.remote_pause import RemotePause
from fleet_server.store import FleetStore, IngestBatch, open_store
from tests.support.mirror import free_port

ADMIN = "admin-secret-token"
READER = "read-only-token"
HOOK_SECRET = b"webhook-shared-secret"
NOW = time.time()
COMMIT = "c" * 40


@contextlib.contextmanager
def serve_app(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free 127.0.0.1 port in a thread; yield its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off", access_log=False))
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10.0
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10.0)


def fill_fleet(store: FleetStore) -> None:
    """Four devices: two canaries in sync (one online), one failed, one never reported its status."""
    store.register_device("cam-01", labels={"site": "north", "ring": "canary"}, now=NOW - 100)
    store.register_device("cam-02", labels={"site": "north", "ring": "main"}, now=NOW - 100)
    store.register_device("gw-01", labels={"site": "south", "ring": "canary"}, now=NOW - 100)
    store.register_device("gw-02", labels={"site": "south"}, now=NOW - 100)
    batch = IngestBatch()
    for device, state in (("cam-01", "in_sync"), ("cam-02", "failed"), ("gw-01", "in_sync")):
        batch.add("status", status_message(device, commit=COMMIT, release=4, sync_state=state, drift={},
                                           paused=False, ts=NOW - 50), NOW - 49)
    batch.add("online", online_message("cam-01", True, NOW - 60), NOW - 59)
    batch.add("online", online_message("cam-02", False, NOW - 60), NOW - 59)
    batch.add("events", event_message("cam-01", type="sync_succeeded", commit=COMMIT, release=4,
                                      ts=NOW - 55), NOW - 54)
    batch.add("health", health_message("cam-01", commit=COMMIT, release=4, ts=NOW - 40,
                                       metrics={"cpu_percent": 12.5},
                                       checks=[{"name": "nginx", "ok": True}]), NOW - 39)
    store.apply_batch(batch)
    store.record_release(4, COMMIT, ["ed25519:key"], NOW - 500, committed_at=NOW - 600)
    store.add_audit("alice", "rollout.pause", "r-1", "looking at canary metrics")


@dataclass
class Api:
    """A running API and what the test needs to talk to it."""

    url: str
    store: FleetStore
    metrics: ServerMetrics
    triggered: list[float] = field(default_factory=list)

    def get(self, path: str, token: str | None = None, **params: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.get(self.url + path, params=params, headers=headers, timeout=5.0)

    def hook(self, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
        return httpx.post(self.url + "/api/v1/hooks/git", content=body, headers=headers or {}, timeout=5.0)


def _config(tmp_path: Path, *, admin: bool = True, read: bool = False, hook: bool = True) -> ServerConfig:
    files: dict[str, Path | None] = {}
    for name, wanted, secret in (("admin", admin, ADMIN.encode()), ("read", read, READER.encode()),
                                 ("hook", hook, HOOK_SECRET)):
        path = tmp_path / f"{name}.token"
        if wanted:
            path.write_bytes(secret + b"\n")
            path.chmod(0o600)
        files[name] = path if wanted else None
    return ServerConfig(
        http=HttpConfig(admin_token_file=files["admin"], read_token_file=files["read"]),
        git=GitConfig(url="git://127.0.0.1/fleet.git", webhook_secret_file=files["hook"],
                      cache_dir=tmp_path / "cache"))


@contextlib.contextmanager
def running_api(tmp_path: Path, *, with_trigger: bool = True, store_config: StoreConfig | None = None,
                broker_port: int | None = None, **auth: bool) -> Iterator[Api]:
    """Start the API for real over a filled store; yield an :class:`Api`. With ``broker_port`` the
    remote pause routes publish through a real MQTT client to the broker there."""
    store = open_store(store_config or StoreConfig(path=tmp_path / "fleet.db"))
    fill_fleet(store)
    server_metrics = ServerMetrics()
    server_metrics.attach_fleet(store, min_interval=0.0)
    triggered: list[float] = []
    config = _config(tmp_path, **auth)
    publisher: Ingestor | None = None
    pauses: RemotePause | None = None
    if broker_port is not None:
        config = dataclasses.replace(config, mqtt=dataclasses.replace(config.mqtt, port=broker_port,
                                                                      client_id="api-publisher"))
        publisher = Ingestor(config, store, server_metrics.ingest, subscribe=False)
        publisher.start()
        assert publisher.wait_connected(10.0)
        connected = publisher

        def publish_control(device: str, paused: bool, reason: str | None) -> None:
            connected.publish_control(device, paused=paused, reason=reason, wait=5.0)

        pauses = RemotePause(store, publish_control)
    actions = ApiActions(trigger_git=(lambda: triggered.append(time.monotonic())) if with_trigger else None,
                         pauses=pauses)
    app = create_app(store, config, server_metrics, actions=actions)
    try:
        with serve_app(app) as url:
            yield Api(url, store, server_metrics, triggered)
    finally:
        if publisher is not None:
            publisher.stop()
        store.close()
