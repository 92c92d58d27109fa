"""The daemon's MQTT side: one broker link and one outbox sender, started and stopped together.

Kept apart from :mod:`edge_agent.report.build` (the report builders) so that one-shot commands
(`edge-agent sync`, `plan`, `status`) never load paho and its TLS stack: only `edge-agent run`
with an ``mqtt`` section pays for them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.config import AgentConfig
from edge_agent.report.mqtt import MqttLink, settings_from_config
from edge_agent.report.outbox import OutboxSender
from edge_agent.state import StateDB

__all__ = ["BaselineHandler", "DesiredHandler", "Reporter"]

log = logging.getLogger(__name__)

_DRAIN_ON_STOP = 2.0  # seconds a clean stop spends sending what is still queued

DesiredHandler = Callable[[str, int, str | None], None]
"""Called with ``(revision, release, rollout_id)`` of every valid ``desired`` message."""

BaselineHandler = Callable[[str, int], None]
"""Called with ``(revision, release)`` of every valid fleet baseline."""


class Reporter:
    """The daemon's MQTT side: one link, one outbox sender in its own thread. Start once, stop once.

    Args:
        config: the agent configuration; its ``mqtt`` section must be set.
        state_path: the agent's state database (the outbox lives there); the reporter opens its own
            connection to it.
        on_desired: called (in paho's thread) with each valid ``desired`` message for this device.
        on_nudge: called (in paho's thread) for each valid broadcast nudge.
        on_baseline: called (in paho's thread) with each valid fleet baseline.
        on_control: called (in paho's thread) with ``(paused, reason)`` of each valid ``control``
            message for this device (the fleet server's remote pause).
        on_preflight: called (in paho's thread) with each valid ``preflight`` request for this device.
        idle_wait: how often the sender looks at the outbox without being notified, in seconds.

    Raises:
        ConfigError: no ``mqtt`` section, or its password file cannot be read.
        BrokerError: the TLS files cannot be loaded.
        StateError: the state database cannot be opened.
    """

    def __init__(self, config: AgentConfig, state_path: Path, *, on_desired: DesiredHandler | None = None,
                 on_nudge: Callable[[], None] | None = None, on_baseline: BaselineHandler | None = None,
                 on_control: Callable[[bool, str | None], None] | None = None,
                 on_preflight: Callable[[dict[str, Any]], None] | None = None,
                 idle_wait: float = 5.0) -> None:
        settings = settings_from_config(config)
        self._on_desired = on_desired
        self._on_nudge = on_nudge
        self._on_baseline = on_baseline
        self._on_control = on_control
        self._on_preflight = on_preflight
        self._idle_wait = idle_wait
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = StateDB(state_path)
        try:
            self._link = MqttLink(settings, on_desired=self._handle_desired, on_nudge=self._handle_nudge,
                                  on_baseline=self._handle_baseline, on_control=self._handle_control,
                                  on_preflight=self._handle_preflight,
                                  on_connected=self.notify)
        except BaseException:
            self._state.close()
            raise
        self._sender = OutboxSender(self._state, self._link)

    @property
    def connected(self) -> bool:
        """True while the broker has accepted the connection."""
        return self._link.connected

    @property
    def refused(self) -> int:
        """How many reports the broker refused (and the sender dropped) since the start."""
        return self._sender.refused

    def start(self) -> None:
        """Start connecting (in paho's thread) and the sender thread; returns at once.

        Raises:
            BrokerError: paho refuses to start.
        """
        self._link.start()
        self._thread = threading.Thread(target=self._run_sender, name="outbox-sender", daemon=True)
        self._thread.start()

    def _run_sender(self) -> None:
        try:
            self._sender.run(self._stop, idle_wait=self._idle_wait, slice_seconds=1.0)
        except Exception:  # a sender crash must not take the agent down; reports wait in the outbox
            log.exception("the outbox sender stopped")

    def notify(self) -> None:
        """Wake the sender: new reports were queued (or the link connected)."""
        self._sender.notify()

    def stop(self, drain_seconds: float = _DRAIN_ON_STOP) -> None:
        """Stop the sender, send what is queued for at most ``drain_seconds``, publish ``online=false``,
        disconnect and close the state database. Idempotent; never raises for a broker that is gone.
        """
        if self._stop.is_set():
            return
        self._stop.set()
        self._sender.notify()
        if self._thread is not None:
            self._thread.join(timeout=30.0)
        try:
            if self._link.connected and drain_seconds > 0:
                self._sender.drain(drain_seconds)
        except Exception:
            log.exception("last outbox drain failed")
        finally:
            self._link.stop()
            self._state.close()

    # -- paho's thread --------------------------------------------------------------------------

    def _handle_desired(self, msg: dict[str, Any]) -> None:
        if self._on_desired is not None:
            self._on_desired(str(msg["revision"]), int(msg["release"]), msg.get("rollout_id"))

    def _handle_nudge(self, msg: dict[str, Any]) -> None:
        log.info("nudge: release %s (%s) is out", msg.get("release"), msg.get("revision"))
        if self._on_nudge is not None:
            self._on_nudge()

    def _handle_baseline(self, msg: dict[str, Any]) -> None:
        if self._on_baseline is not None:
            self._on_baseline(str(msg["revision"]), int(msg["release"]))

    def _handle_preflight(self, msg: dict[str, Any]) -> None:
        if self._on_preflight is not None:
            self._on_preflight(msg)

    def _handle_control(self, msg: dict[str, Any]) -> None:
        if self._on_control is not None:
            self._on_control(bool(msg["paused"]), msg.get("reason"))
