"""Fleet-server crash under ingest: SIGKILL the ``fleet-server`` process twice while 20 devices
publish numbered QoS 1 events; after each restart (same client id: the broker kept its persistent
session and queued what came meanwhile) every event the devices' outboxes deleted, i.e. that the
broker acknowledged, must end up in the store exactly once.

Devices are the agent's real reporting stack (state database + outbox, ``MqttLink``,
``OutboxSender``; see ``test_broker_outage.py``), in one forked process; the server is the real
``fleet-server`` command; the broker a real Mosquitto. The mid-rollout crash is covered in-process
by ``tests/test_rollout_fleet.py`` (a restart mid-wave); see docs/reliability.md, section 5.
"""

from __future__ import annotations

import json
import multiprocessing
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.reliability.support import Proc, wait_until
from tests.reliability.test_broker_outage import SimDevice
from tests.support.broker import Mosquitto
from tests.support.mirror import free_port, wait_for_port

pytestmark = pytest.mark.timeout(180)

BIN = Path(sys.executable).parent
DEVICES = 20
RATE = 10.0  # events per second per device
RUN = 12.0  # seconds of reporting
KILLS_AT = (3.0, 7.5)  # seconds after the start
DOWN = 1.5  # seconds the server stays dead


def device_host(port: int, ids: list[str], work: Path, go: Path, out: Path) -> None:
    """Forked: the devices report at RATE for RUN seconds, then drain their outboxes."""
    result: dict[str, Any] = {"error": None}
    devices: list[SimDevice] = []
    try:
        devices = [SimDevice(i, port, work / i) for i in ids]
        for d in devices:
            d.start()
        wait_until(lambda: all(d.link.connected for d in devices), "every device to connect", 30)
        (work / "ready").write_text("")
        wait_until(go.exists, "the start signal", 60, 0.01)
        started = time.monotonic()
        tick = 0
        while time.monotonic() - started < RUN:
            for d in devices:
                d.emit()
            tick += 1
            time.sleep(max(0.0, tick / RATE - (time.monotonic() - started)))
        wait_until(lambda: all(d.state.outbox_count() == 0 for d in devices), "every outbox to drain", 60)
        result["sent"] = {d.id: d.seq for d in devices}
        result["refused"] = sum(d.sender.refused for d in devices)
    except BaseException as exc:  # reported to the parent through the result file
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        for d in devices:
            d.stop()
    out.write_text(json.dumps(result))


def stored_seqs(db: Path) -> dict[str, list[int]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute("SELECT device, detail FROM events ORDER BY id").fetchall()
    finally:
        conn.close()
    out: dict[str, list[int]] = {}
    for device, detail in rows:
        out.setdefault(device, []).append(int(json.loads(detail)["detail"]["seq"]))
    return out


def test_sigkill_of_the_fleet_server_under_ingest_loses_nothing_acknowledged(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker", extra_lines=["max_inflight_messages 1000",
                                                     "max_queued_messages 100000"]) as broker:
        ids = [f"dev-{n:02d}" for n in range(DEVICES)]
        go = tmp_path / "go"
        work = tmp_path / "host"
        work.mkdir()
        host = multiprocessing.get_context("fork").Process(
            target=device_host, args=(broker.port, ids, work, go, tmp_path / "result.json"))
        host.start()
        http = free_port()
        cfg = {"mqtt": {"host": "127.0.0.1", "port": broker.port, "keepalive": 5,
                        "client_id": "fleet-server-crash"},
               "store": {"path": str(tmp_path / "fleet.db")},
               "http": {"host": "127.0.0.1", "port": http}}
        (tmp_path / "server.yaml").write_text(yaml.safe_dump(cfg))
        argv: list[str | Path] = [BIN / "fleet-server", "--config", tmp_path / "server.yaml"]
        servers = [Proc(argv, tmp_path / "server-0.log")]
        try:
            wait_for_port(http, timeout=20)
            wait_until((work / "ready").exists, "the devices", 60)
            go.write_text("")
            started = time.monotonic()
            for n, at in enumerate(KILLS_AT, 1):
                time.sleep(max(0.0, at - (time.monotonic() - started)))
                servers[-1].p.send_signal(signal.SIGKILL)
                servers[-1].wait(10)
                time.sleep(DOWN)
                servers.append(Proc(argv, tmp_path / f"server-{n}.log"))
                wait_for_port(http, timeout=20)
            host.join(timeout=RUN + 90)
            if host.is_alive():
                host.kill()
                host.join(timeout=10)
            result = json.loads((tmp_path / "result.json").read_text())
            assert result["error"] is None, result
            sent: dict[str, int] = result["sent"]
            total = sum(sent.values())

            def stored_total() -> int:
                return sum(len(v) for v in stored_seqs(tmp_path / "fleet.db").values())

            wait_until(lambda: stored_total() >= total, "the restarted server to store everything", 60, 0.2)
        finally:
            for s in servers:
                s.stop()
            if host.is_alive():
                host.kill()
                host.join(timeout=10)
    stored = stored_seqs(tmp_path / "fleet.db")
    print(f"\nserver crash: {len(ids)} devices sent {total} events over {RUN:.0f}s; "
          f"fleet-server SIGKILLed at {KILLS_AT} s, down {DOWN}s each time; "
          f"stored {sum(len(v) for v in stored.values())}; "
          f"refused by the broker {result['refused']}")
    assert result["refused"] == 0
    for dev in ids:
        assert sorted(stored.get(dev, [])) == list(range(sent[dev])), f"{dev}: missing or duplicated events"
    assert min(sent.values()) >= int(RATE * RUN) - 2
