"""Rollout of a simulated fleet: 10,000 devices through 4 waves with zero soak.

    .venv/bin/python bench/bench_rollout.py [--devices 10000] [--waves 4]

A real Mosquitto (anonymous, no ACLs: one simulated-fleet client publishes for every device id),
the real fleet-server parts (Store, Ingestor, RolloutRunner ticking every second) in this process,
and a :class:`SimFleet` in a child process: one paho client that answers every retained
``desired`` message with the reports a device sends after a successful sync (``sync_succeeded`` and
a ``status``), exactly in the message schema the agent uses. Reports the wall time from ``start``
to ``succeeded`` and the CPU share of the server process (user + system CPU seconds / wall seconds)
during it. Everything runs on 127.0.0.1; the broker and the child are stopped by pid.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent.report import messages as m

__all__ = ["SimFleet", "main"]

PREFIX = "fleet/v1"

Outcome = Callable[[str, int], str]
"""``outcome(device, release) -> "applied" | "failed" | "rolled_back" | "refused"``."""
_EVENT = {"applied": "sync_succeeded", "failed": "sync_failed", "rolled_back": "sync_rolled_back",
          "refused": "sync_refused"}


class SimFleet:
    """Many simulated devices behind ONE paho client (the broker must run without ACLs).

    Each device starts on ``initial`` (release, commit), reports ``online`` and ``status``, and
    answers each ``desired`` message with the outcome ``outcome(device, release)`` gives: an event
    (``sync_succeeded`` etc.) and a new ``status``. A device set offline publishes ``online=false``
    and ignores assignments until it is set online again, when it handles the latest one it got.

    Args:
        port: the broker's port on 127.0.0.1.
        devices: device id -> labels.
        initial: (release, commit) every device runs at first.
        outcome: decides how a sync to a release ends on a device (default: always applied).
        client_id: the MQTT client id.
    """

    def __init__(self, port: int, devices: Mapping[str, Mapping[str, str]], *, initial: tuple[int, str],
                 outcome: Outcome | None = None, client_id: str = "sim-fleet") -> None:
        self.port = port
        self.labels = {d: dict(v) for d, v in devices.items()}
        self.running: dict[str, tuple[int, str]] = dict.fromkeys(devices, initial)
        self.outcome: Outcome = outcome or (lambda _d, _r: "applied")
        self.offline: set[str] = set()
        self.paused: set[str] = set()
        self.pending: dict[str, tuple[int, str]] = {}
        self.received: dict[str, list[int]] = {d: [] for d in devices}
        self._lock = threading.Lock()
        self._seq = 0
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self._client.max_inflight_messages_set(1000)
        self._client.max_queued_messages_set(0)
        self._client.on_message = self._on_message
        self._subscribed = threading.Event()
        self._client.on_subscribe = lambda *_a: self._subscribed.set()

    def _ts(self) -> float:
        with self._lock:
            self._seq += 1
            return time.time() + self._seq * 1e-6

    def _send(self, device: str, kind: str, msg: dict[str, Any], *, retain: bool = False) -> None:
        self._client.publish(m.topic(PREFIX, device, kind), m.encode(msg), qos=1, retain=retain)

    def _status(self, device: str) -> None:
        release, commit = self.running[device]
        msg = m.status_message(device, commit=commit, release=release, sync_state="in_sync", drift={},
                               paused=device in self.paused, ts=self._ts())
        self._send(device, "status", msg, retain=True)

    def start(self, timeout: float = 10.0) -> None:
        """Connect, report every device online with its status, subscribe to every ``desired``.

        Raises:
            TimeoutError: the subscription was not acknowledged within ``timeout``.
        """
        self._client.connect("127.0.0.1", self.port)
        self._client.loop_start()
        for device in self.running:
            self._send(device, "online", m.online_message(device, True, self._ts()), retain=True)
            self._status(device)
        self._client.subscribe(f"{PREFIX}/+/desired", qos=1)
        if not self._subscribed.wait(timeout):
            raise TimeoutError("the broker did not acknowledge the subscription")

    def stop(self) -> None:
        """Disconnect (the devices' retained online messages stay as they are)."""
        self._client.disconnect()
        self._client.loop_stop()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        parsed = m.parse_topic(PREFIX, msg.topic)
        if parsed is None or parsed[0] is None or parsed[0] not in self.running:
            return
        device = parsed[0]
        desired = m.decode("desired", bytes(msg.payload), topic_device=device)
        with self._lock:
            self.received[device].append(int(desired["release"]))
            self.pending[device] = (int(desired["release"]), str(desired["revision"]))
            if device in self.offline or device in self.paused:
                return
        self._apply(device)

    def _apply(self, device: str) -> None:
        with self._lock:
            want = self.pending.pop(device, None)
        if want is None or want == self.running[device]:
            if want is not None:
                self._event(device, "applied", want)
            return
        outcome = self.outcome(device, want[0])
        if outcome == "applied":
            self.running[device] = want
        self._event(device, outcome, want)
        self._status(device)

    def _event(self, device: str, outcome: str, concerns: tuple[int, str]) -> None:
        msg = m.event_message(device, type=_EVENT[outcome], commit=concerns[1], release=concerns[0], ts=self._ts(),
                              reason=None if outcome == "applied" else f"simulated {outcome}")
        self._send(device, "events", msg)

    def set_online(self, device: str, online: bool) -> None:
        """Take a device off the broker (``online=false``, assignments ignored) or bring it back."""
        with self._lock:
            (self.offline.discard if online else self.offline.add)(device)
        self._send(device, "online", m.online_message(device, online, self._ts()), retain=True)
        if online:
            self._status(device)
            self._apply(device)

    def set_paused(self, device: str, paused: bool) -> None:
        """Hold (update lock) or release a device: paused devices defer assignments and say so."""
        with self._lock:
            (self.paused.discard if not paused else self.paused.add)(device)
        release, commit = self.running[device]
        self._send(device, "events", m.event_message(device, type="paused" if paused else "resumed",
                                                     commit=commit, release=release, ts=self._ts(),
                                                     reason="update lock"))
        self._status(device)
        if not paused:
            self._apply(device)


def _fleet_main(port: int, count: int, initial: tuple[int, str], ready: Any, stop: Any) -> None:
    devices = {f"dev-{i:05d}": ({"canary": "true"} if i < 10 else {}) for i in range(count)}
    fleet = SimFleet(port, devices, initial=initial, client_id="bench-fleet")
    fleet.start(timeout=60.0)
    ready.set()
    stop.wait(3600)
    fleet.stop()


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(devices: int, waves: int, timeout: float) -> dict[str, Any]:
    """Run the benchmark once and return its figures."""
    from fleet_server.config import parse_server_config
    from fleet_server.ingest import Ingestor
    from fleet_server.metrics import ServerMetrics
    from fleet_server.rollouts.plan import parse_plan
    from fleet_server.rollouts.runner import RolloutRunner
    from fleet_server.store import Store
    from tests.support.broker import Mosquitto

    work = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    old, new = (1, "1" * 40), (2, "2" * 40)
    try:
        with Mosquitto(work / "broker", extra_lines=["max_inflight_messages 1000",
                                                     "max_queued_messages 1000000"]) as broker:
            config = parse_server_config({"mqtt": {"port": broker.port, "client_id": "bench-server"},
                                          "store": {"path": str(work / "fleet.db")}}, work)
            store = Store(config.store.path)
            metrics = ServerMetrics()
            ingestor = Ingestor(config, store, metrics.ingest)
            ingestor.start()
            ingestor.wait_connected(10.0)
            ctx = mp.get_context("spawn")
            ready, stop = ctx.Event(), ctx.Event()
            child = ctx.Process(target=_fleet_main, args=(broker.port, devices, old, ready, stop))
            child.start()
            try:
                ready.wait(120)
                deadline = time.monotonic() + 120
                while store.count_devices() < devices and time.monotonic() < deadline:
                    time.sleep(0.2)
                for version, commit in (old, new):
                    store.record_release(version, commit, ["bench"], time.time())
                percents = [round(100 * (i + 1) / waves, 2) for i in range(waves)]
                plan = parse_plan({"waves": [{"percent": p, "soak": 0, "timeout": 600} for p in percents]},
                                  source="bench.yaml")
                runner = RolloutRunner(store, ingestor.publish_desired, tick_interval=1.0)
                runner.load()
                cpu0, t0 = _cpu(), time.monotonic()
                rid = runner.start(new[0], plan, actor="bench", reason="bench")
                runner.start_thread()
                phase = "running"
                while time.monotonic() - t0 < timeout:
                    state = runner.state(rid)
                    phase = state.phase if state else "missing"
                    if phase in ("succeeded", "halted", "rolled_back", "aborted"):
                        break
                    time.sleep(0.2)
                wall, cpu = time.monotonic() - t0, _cpu() - cpu0
                runner.stop()
                summary = store.summary()
            finally:
                stop.set()
                child.join(30)
                if child.is_alive() and child.pid is not None:
                    os.kill(child.pid, 9)
                ingestor.stop()
            store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"devices": devices, "waves": waves, "phase": phase, "wall_seconds": round(wall, 2),
            "server_cpu_seconds": round(cpu, 2), "server_cpu_share": round(cpu / wall, 3) if wall else None,
            "releases": summary["releases"]}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its figures as JSON; exit 1 when the rollout did not succeed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--devices", type=int, default=10000)
    parser.add_argument("--waves", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    result = run(args.devices, args.waves, args.timeout)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0 if result["phase"] == "succeeded" else 1


if __name__ == "__main__":
    raise SystemExit(main())
