"""Secrets stay secret: sealed secrets go through everything the agent and the server do, then every
byte the run left behind is searched for the plaintext.

The run: a secret sealed to the device (``fleetctl secret seal``, the real command) lands through a
signed release pulled from a real ``git daemon``; ``plan`` is shown; the file is tampered with and
drift puts it back; a second release changes the secret; a third one fails its health check and is
rolled back (the secret's previous content restored from the backup store); the operator rolls back
to the first release; health is reported. Every report in the outbox is sent through a real
Mosquitto to the fleet server's real ingest and store.

Searched afterwards, for both plaintexts (raw and base64): every log record (DEBUG and up), every
plan output, every outbox payload, every file of the state directory but the backup store, the
server's database files (the SQLite file, or every file of the PostgreSQL cluster, write-ahead log
included: the test runs on both backends), the broker's database and log, and the backup store: it
holds captured file contents only while a transaction may still need undoing (that is how a
rolled-back secret comes back), owner-only, and drops them once every transaction has finished.
"""

from __future__ import annotations

import base64
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edge_agent.agent import check_drift, plan_only, report_health, sync_once
from edge_agent.identity import init_identity
from edge_agent.report.mqtt import MqttLink, MqttSettings
from edge_agent.report.outbox import OutboxSender
from edge_agent.state import StateDB
from fleet_server.config import StoreConfig, parse_server_config
from fleet_server.ingest import Ingestor
from fleet_server.metrics import ServerMetrics
from fleet_server.store import open_store
from tests.support.agent_fleet import AgentFleet, bundle
from tests.support.broker import Mosquitto
from tests.support.stores import store_section
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(120)

FIRST = b"wifi-psk-first-Zq9xK2mV7pL4-plaintext"
SECOND = b"wifi-psk-second-Hh3Ww8Rr1Tt6-plaintext"


def seal_to(fleet: AgentFleet, public: str, plaintext: bytes) -> str:
    out = fleet.tmp / "sealed.json"
    done = subprocess.run([sys.executable, "-m", "fleet_server.fleetctl", "secret", "seal", "--to", public,
                           "--id", "wifi-psk", "--out", str(out)],
                          input=plaintext, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return out.read_text()


def release(sealed: str, *, healthy: bool = True) -> dict[str, str | bytes]:
    check = ["true"] if healthy else ["false"]
    return {
        "fleet.yaml": "description: secrets\n",
        "secrets/wifi-psk.sealed.json": sealed,
        "bundles/app/bundle.yaml": bundle([
            {"kind": "secret_file", "path": "/etc/app/wifi.psk", "secret": "secrets/wifi-psk.sealed.json"},
            {"kind": "file", "path": "/etc/motd", "content": f"healthy={healthy}\n", "mode": "0644"},
        ], health=[{"kind": "command", "name": "probe", "run": check, "timeout": 5}]),
    }


def needles() -> list[bytes]:
    out = []
    for p in (FIRST, SECOND):
        out += [p, base64.b64encode(p), base64.b64encode(p)[:24], p.hex().encode()]
    return out


def leaks(data: bytes) -> list[bytes]:
    return [n for n in needles() if n in data]


def deliver(fleet: AgentFleet, port: int) -> int:
    """Send the device's whole outbox through the broker; return how many reports went."""
    state = StateDB(fleet.state_dir / "state.db")
    link = MqttLink(MqttSettings(host="127.0.0.1", port=port, device_id="dev-1", keepalive=5,
                                 reconnect_min=0.1, reconnect_max=0.5))
    sender = OutboxSender(state, link)
    stop = threading.Event()
    thread = threading.Thread(target=sender.run, args=(stop,), kwargs={"idle_wait": 0.1}, daemon=True)
    try:
        queued = state.outbox_count()
        link.start()
        assert link.wait_connected(10)
        thread.start()
        sender.notify()
        wait_until(lambda: state.outbox_count() == 0, "the outbox to drain", 20)
        return queued
    finally:
        stop.set()
        sender.notify()
        thread.join(timeout=10)
        link.stop(offline_wait=1.0)
        state.close()


def test_no_plaintext_anywhere_after_sync_drift_plan_rollback_reports_and_server(
        fleet: AgentFleet, tmp_path: Path, caplog: pytest.LogCaptureFixture, store_config: StoreConfig,
        request: pytest.FixtureRequest) -> None:
    caplog.set_level("DEBUG")
    ident = init_identity(fleet.config.state_dir)
    target = fleet.root / "etc/app/wifi.psk"
    plans: list[str] = []

    v1 = fleet.publish(release(seal_to(fleet, ident.encryption_public, FIRST)))
    plans.append(plan_only(fleet.config))
    assert sync_once(fleet.config).outcome == "applied"
    assert target.read_bytes() == FIRST
    target.write_bytes(b"tampered on the device")
    plans.append(plan_only(fleet.config))
    assert check_drift(fleet.config).corrected
    assert target.read_bytes() == FIRST

    fleet.publish(release(seal_to(fleet, ident.encryption_public, SECOND)))
    plans.append(plan_only(fleet.config))
    assert sync_once(fleet.config).outcome == "applied"
    assert target.read_bytes() == SECOND

    fleet.publish(release(seal_to(fleet, ident.encryption_public, FIRST), healthy=False))
    bad = sync_once(fleet.config)
    assert bad.outcome == "rolled_back", bad
    assert target.read_bytes() == SECOND  # restored from the backup store

    back = sync_once(fleet.config, want=v1)
    assert back.outcome == "applied", back
    assert target.read_bytes() == FIRST
    report_health(fleet.config)
    outbox = fleet.outbox()
    assert outbox

    with Mosquitto(tmp_path / "broker") as broker:
        config = parse_server_config({"mqtt": {"port": broker.port, "client_id": "fleet-server-secrets"},
                                      "store": store_section(store_config)}, tmp_path)
        store = open_store(config.store)
        ingestor = Ingestor(config, store, ServerMetrics().ingest)
        try:
            ingestor.start()
            assert ingestor.wait_connected(10)
            sent = deliver(fleet, broker.port)
            def ingested() -> int:
                return sum(v for k, v in store.counters().items() if k.startswith("ingested."))

            wait_until(lambda: ingested() >= sent, "the server to store every report", 20)
            assert ingestor.drain(10)
            assert any(e["type"] == "sync_rolled_back" for e in store.device_events("dev-1", limit=100))
        finally:
            ingestor.stop()
            store.close()
    broker_files = [p for p in (tmp_path / "broker").iterdir() if p.is_file()]
    # the server's database files: the SQLite file and its journal, or every file of the PostgreSQL
    # cluster (tables, indexes and the write-ahead log; the other tests' databases too)
    database_files = (list(tmp_path.glob("fleet.db*")) if store_config.backend == "sqlite"
                      else list(request.getfixturevalue("postgres_cluster").data_dir.rglob("*")))

    found: dict[str, list[bytes]] = {}
    for i, text in enumerate(plans):
        if hits := leaks(text.encode()):
            found[f"plan output {i}"] = hits
    if hits := leaks(caplog.text.encode()):
        found["log records"] = hits
    for topic, payload in outbox:
        if hits := leaks(payload):
            found[f"outbox {topic}"] = hits
    searched = 0
    backups = fleet.state_dir / "backups"
    in_backups: list[str] = []
    for path in [*fleet.state_dir.rglob("*"), *database_files, *broker_files]:
        if not path.is_file():
            continue
        searched += 1
        hits = leaks(path.read_bytes())
        if backups in path.parents:
            if hits:
                in_backups.append(str(path.relative_to(backups)))
            continue
        if hits:
            found[str(path)] = hits
    print(f"\nsecrets: searched {len(plans)} plan outputs, {len(caplog.records)} log records, {len(outbox)} "
          f"outbox payloads, {searched} files (state dir, server database, broker database and log); "
          f"plaintext found in: {sorted(found) or 'nothing'}; backup store files holding a "
          f"previous plaintext now: {in_backups or 'none'}")
    assert not found, found
    assert not in_backups, f"finished transactions left secret contents in the backup store: {in_backups}"
    # The backup store holds captured contents only for its owner.
    assert stat.S_IMODE(backups.stat().st_mode) == 0o700
    for path in backups.rglob("*"):
        assert not stat.S_IMODE(path.lstat().st_mode) & 0o077, path
