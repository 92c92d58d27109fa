"""A simulated device reporting stack: state database, outbox, MQTT link and sender thread."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from edge_agent.report.build import queue_report
from edge_agent.report.mqtt import MqttLink, MqttSettings
from edge_agent.report.outbox import OutboxSender
from edge_agent.state import StateDB
from edge_core import messages

PREFIX = "fleet/v1"


class SimDevice:
    """One device's reporting stack: state database + outbox, MQTT link, sender thread."""

    def __init__(self, device_id: str, port: int, state_dir: Path) -> None:
        state_dir.mkdir(parents=True)
        self.id = device_id
        self.state = StateDB(state_dir / "state.db")
        settings = MqttSettings(host="127.0.0.1", port=port, device_id=device_id, keepalive=5,
                                reconnect_min=0.5, reconnect_max=4.0)
        self.link = MqttLink(settings, on_connected=self.notify)
        self.sender = OutboxSender(self.state, self.link)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.sender.run, args=(self.stop_event,),
                                       kwargs={"idle_wait": 0.5, "slice_seconds": 1.0}, daemon=True)
        self.seq = 0
        self.last_ts = 0.0

    def notify(self) -> None:
        self.sender.notify()

    def start(self) -> None:
        self.link.start()
        self.thread.start()

    def emit(self) -> None:
        """Queue the next numbered event (distinct timestamps, as the store keys events by them)."""
        ts = max(time.time(), self.last_ts + 0.001)
        self.last_ts = ts
        msg = messages.event_message(self.id, type="drift_detected", commit=None, release=None, ts=ts,
                                     detail={"seq": self.seq})
        queue_report(self.state, PREFIX, "events", msg)
        self.seq += 1
        self.sender.notify()

    def stop(self) -> None:
        self.stop_event.set()
        self.sender.notify()
        self.thread.join(timeout=10)
        self.link.stop(offline_wait=1.0)
        self.state.close()
