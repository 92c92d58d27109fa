"""Simulated devices for the rollout benchmark: many device ids behind one MQTT connection.

paho waits on its sockets with ``select()`` and tops out near 340 clients per process, so a
simulated fleet of 100,000 devices cannot be 100,000 connections. One :class:`LoadFleet` (one paho
client, in its own process) publishes on behalf of a slice of the device ids. That is allowed
because the broker of the benchmark runs without ACLs, and because the fleet server checks the
device id of a message's topic against the ``device`` field of its payload (``messages.decode``
with ``topic_device``), never against the MQTT client id.

Each device:

* registers: ``online`` (retained) and its first ``status`` (retained, with its labels);
* sends a heartbeat every ``heartbeat`` seconds, ``status`` and ``health`` in turn, at a phase of
  its own (so a fleet of N sends N / heartbeat messages a second, evenly);
* answers a ``desired`` assignment after a seeded delay (``answer_delay``, uniform) with the
  messages the agent sends after a sync: ``sync_succeeded`` (or ``sync_failed`` with probability
  ``failure_rate``) and a ``status``.

Every message is QoS 1, in the agent's schema. The counts of what was published (and acknowledged
by the broker) are kept per kind, so the benchmark can compare them with what the server stored.
"""

from __future__ import annotations

import heapq
import random
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_core import messages as m
from edge_core.errors import MessageError

__all__ = ["FleetOptions", "LoadFleet", "fleet_process"]

PREFIX = "fleet/v1"
MAX_UNACKED = 20_000
"""Messages a connection may have published and not yet seen acknowledged. paho keys its queue of
outgoing QoS 1 messages by message id (1..65535): queueing more than that at once reuses the id of
a message still queued, which then is never sent nor acknowledged, so publishing waits below it."""
_CHECKS = [{"name": "app", "ok": True}]


@dataclass(frozen=True)
class FleetOptions:
    """How the simulated devices behave (see the module docstring)."""

    initial: tuple[int, str]
    heartbeat: float = 60.0
    answer_delay: tuple[float, float] = (1.0, 5.0)
    failure_rate: float = 0.005
    seed: int = 1


@dataclass
class _Device:
    release: int
    commit: str
    sync_state: str = "in_sync"
    labels: dict[str, str] = field(default_factory=dict)
    beats: int = 0


class LoadFleet:
    """One MQTT connection publishing for many device ids (see the module docstring).

    Args:
        port: the broker's port on 127.0.0.1.
        devices: device id -> labels, the slice this connection speaks for.
        options: the behaviour of the devices.
        client_id: the MQTT client id.
    """

    def __init__(self, port: int, devices: dict[str, dict[str, str]], options: FleetOptions, *,
                 client_id: str) -> None:
        self.port = port
        self.options = options
        release, commit = options.initial
        self.devices = {d: _Device(release, commit, labels=dict(labels)) for d, labels in devices.items()}
        self.sent: dict[str, int] = {"online": 0, "status": 0, "health": 0, "events": 0}
        self.answered = {"applied": 0, "failed": 0}
        self._acked = 0
        self._rng = random.Random(options.seed)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._room = threading.Condition(self._lock)  # fewer than MAX_UNACKED messages unacknowledged
        self._sent_total = 0
        self._heap: list[tuple[float, int, str, str]] = []
        self._seq = 0
        self._stop = threading.Event()
        self._beating = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self._client.max_inflight_messages_set(1000)
        self._client.max_queued_messages_set(0)
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._subscribed = threading.Event()
        self._client.on_subscribe = lambda *_a: self._subscribed.set()
        self._thread = threading.Thread(target=self._run, name="load-fleet", daemon=True)

    # --- publishing ------------------------------------------------------------------------------

    def _on_publish(self, *_args: Any) -> None:
        with self._lock:
            self._acked += 1
            self._room.notify_all()

    def _send(self, device: str, kind: str, msg: dict[str, Any], *, retain: bool = False) -> None:
        with self._lock:
            while self._sent_total - self._acked >= MAX_UNACKED and not self._stop.is_set():
                self._room.wait(0.5)
            self.sent[kind] += 1
            self._sent_total += 1
        self._client.publish(m.topic(PREFIX, device, kind), m.encode(msg), qos=1, retain=retain)

    def _status(self, device: str, dev: _Device, *, labels: bool = False) -> None:
        msg = m.status_message(device, commit=dev.commit, release=dev.release, sync_state=dev.sync_state,
                               drift={}, paused=False, ts=time.time(), labels=dev.labels if labels else None)
        self._send(device, "status", msg, retain=True)

    def _health(self, device: str, dev: _Device) -> None:
        metrics = {"cpu_percent": round(self._rng.uniform(5, 40), 1),
                   "memory_percent": round(self._rng.uniform(20, 60), 1)}
        self._send(device, "health", m.health_message(device, commit=dev.commit, release=dev.release,
                                                      ts=time.time(), metrics=metrics, checks=_CHECKS))

    # --- lifecycle -------------------------------------------------------------------------------

    def register(self, timeout: float = 30.0) -> None:
        """Connect, subscribe to every ``desired``, and publish each device's ``online`` and first
        ``status`` (queued in paho; they reach the broker as fast as it takes them).

        Raises:
            TimeoutError: the subscription was not acknowledged within ``timeout``.
        """
        self._client.connect("127.0.0.1", self.port, keepalive=60)
        self._client.loop_start()
        self._client.subscribe(f"{PREFIX}/+/desired", qos=1)
        if not self._subscribed.wait(timeout):
            raise TimeoutError("the broker did not acknowledge the subscription")
        for device, dev in self.devices.items():
            self._send(device, "online", m.online_message(device, True, time.time()), retain=True)
            self._status(device, dev, labels=True)
        self._thread.start()

    def start_heartbeats(self) -> None:
        """Start every device's heartbeat, each at a random phase within one period."""
        now = time.monotonic()
        with self._lock:
            for device in self.devices:
                self._push(now + self._rng.uniform(0, self.options.heartbeat), "beat", device)
            self._wake.notify()
        self._beating.set()

    def wait_acked(self, timeout: float) -> bool:
        """Wait (bounded) until the broker acknowledged every message published so far."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._acked >= sum(self.sent.values()):
                    return True
            time.sleep(0.1)
        return False

    def stop_sending(self) -> None:
        """Stop the heartbeats and the answers to assignments (the connection stays up)."""
        self._stop.set()
        with self._lock:
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(10.0)

    def disconnect(self) -> None:
        """Disconnect from the broker (the devices' retained messages stay)."""
        self._client.disconnect()
        self._client.loop_stop()

    # --- the schedule ------------------------------------------------------------------------------

    def _push(self, due: float, action: str, device: str) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, action, device))

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                now = time.monotonic()
                due: list[tuple[str, str]] = []
                while self._heap and self._heap[0][0] <= now and len(due) < 2000:
                    _, _, action, device = heapq.heappop(self._heap)
                    due.append((action, device))
                if not due:
                    wait = self._heap[0][0] - now if self._heap else 0.5
                    self._wake.wait(min(0.5, max(0.001, wait)))
                    continue
            self._act(due)

    def _act(self, due: Iterable[tuple[str, str]]) -> None:
        for action, device in due:
            dev = self.devices[device]
            if action == "beat":
                dev.beats += 1
                (self._status if dev.beats % 2 else self._health)(device, dev)
                with self._lock:
                    self._push(time.monotonic() + self.options.heartbeat, "beat", device)
            else:
                self._answer(device, dev, action)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        parsed = m.parse_topic(PREFIX, msg.topic)
        if parsed is None or parsed[0] is None or parsed[0] not in self.devices:
            return
        try:
            desired = m.decode("desired", bytes(msg.payload), topic_device=parsed[0])
        except MessageError:
            return
        low, high = self.options.answer_delay
        with self._lock:
            delay = self._rng.uniform(low, high)
            self._push(time.monotonic() + delay, f"{int(desired['release'])}:{desired['revision']}", parsed[0])
            self._wake.notify()

    def _answer(self, device: str, dev: _Device, action: str) -> None:
        release_text, _, commit = action.partition(":")
        release = int(release_text)
        if (release, commit) == (dev.release, dev.commit):
            self._status(device, dev)  # already runs it: a no-op sync sends no event, the status says so
            return
        with self._lock:
            failed = self._rng.random() < self.options.failure_rate
            self.answered["failed" if failed else "applied"] += 1
        ts = time.time()
        if failed:
            dev.sync_state = "failed"
            self._send(device, "events", m.event_message(device, type="sync_failed", commit=commit,
                                                         release=release, ts=ts, reason="simulated failure"))
        else:
            dev.release, dev.commit, dev.sync_state = release, commit, "in_sync"
            self._send(device, "events", m.event_message(device, type="sync_succeeded", commit=commit,
                                                         release=release, ts=ts))
        self._status(device, dev)


def fleet_process(port: int, devices: dict[str, dict[str, str]], options: FleetOptions, client_id: str,
                  conn: Any) -> None:
    """Run one :class:`LoadFleet` in a child process, driven over the pipe ``conn``: it answers
    ``("registered", sent)`` once registration is published and acknowledged, starts heartbeats on
    ``"beat"``, and on ``"stop"`` stops, waits for the last acknowledgements and answers
    ``("stopped", {"sent": {...}, "answered": {...}, "acked": bool})``."""
    fleet = LoadFleet(port, devices, options, client_id=client_id)
    fleet.register()
    acked = fleet.wait_acked(600.0)
    conn.send(("registered", {"sent": dict(fleet.sent), "acked": acked}))
    while True:
        if not conn.poll(1.0):
            continue
        command = conn.recv()
        if command == "beat":
            fleet.start_heartbeats()
        elif command == "stop":
            fleet.stop_sending()
            acked = fleet.wait_acked(60.0)
            fleet.disconnect()
            conn.send(("stopped", {"sent": dict(fleet.sent), "answered": dict(fleet.answered), "acked": acked}))
            return
