"""Send the outbox: publish queued reports in order and delete each only after the broker's ack.

Reports are written to the state database (``StateDB.outbox_put``) before anything is sent, so a
broker outage, a crash or a restart loses nothing. :class:`OutboxSender` drains them:

* rows are read oldest first (``outbox_peek``) and published at QoS 1 at least (a QoS 0 row is
  raised to 1: only an acknowledged message may be deleted), with the row's ``retain`` flag;
* **in-flight window**: up to ``window`` rows (default 16, below paho's 20 in-flight messages) may be
  published before the oldest is acknowledged, which keeps a round trip per report off the
  critical path. One connection delivers them in publish order, and paho resends unacknowledged
  QoS 1 messages in that same order after a reconnect, so the broker receives them in order.
  paho resends them only after its connect callbacks ran, so after a reconnect no new row is
  published until every row published on an earlier connection is acknowledged: a row published
  at once would reach the broker before the older rows paho is about to resend;
* **deletion is strictly in order**: a row is deleted only when it *and every row before it* has
  been acknowledged; the drain stops at the first row whose acknowledgement does not come in time;
* a row already handed to this link is never published twice by this sender (paho still holds it
  and resends it on reconnect). A new sender on a new link (an agent restart) publishes every row
  still in the outbox again: delivery is *at least once*, and a receiver may see a report twice;
* a broker that acknowledges with a failure reason code (MQTT 5, e.g. ``Not authorized`` from an
  ACL) has answered for good: the row is deleted, logged and counted in :attr:`OutboxSender.refused`.
  Retrying would block every later report behind a message the broker will never take.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from edge_agent.report.mqtt import MqttLink, PublishTracking
from edge_agent.state import StateDB
from edge_agent.state_outbox import OutboxItem
from edge_core.errors import BrokerError, StateError

__all__ = ["OutboxSender"]

log = logging.getLogger(__name__)

_IDLE_WAIT = 5.0  # seconds run() sleeps when there is nothing to do and nobody notifies it
_SLICE = 0.25  # the longest single wait, so that a stop is seen quickly


class OutboxSender:
    """Drains the outbox of ``state`` over ``link``; see the module docstring.

    Args:
        state: the agent's state database (the outbox lives there).
        link: a started (or about to start) MQTT link; one sender per link.
        window: how many rows may be in flight (published, not yet acknowledged) at once.
        clock: monotonic clock in seconds (for the drain's time bound).
    """

    def __init__(self, state: StateDB, link: MqttLink, *, window: int = 16,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if window < 1:
            raise ValueError(f"outbox window must be positive, got {window}")
        self._state = state
        self._link = link
        self._window = window
        self._clock = clock
        self._inflight: dict[int, PublishTracking] = {}
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self.refused = 0
        """How many rows the broker refused (deleted without delivery) since construction."""

    def notify(self) -> None:
        """Wake :meth:`run`: rows were added or the link (re)connected."""
        self._wake.set()

    def drain(self, max_seconds: float) -> int:
        """Send queued rows for at most ``max_seconds``; return how many were acknowledged and deleted.

        Returns early when the outbox is empty, or when the link is not connected and has nothing
        in flight. Safe to call from one thread at a time (calls are serialised).

        Raises:
            StateError: the outbox cannot be read or written.
        """
        with self._lock:
            return self._drain(self._clock() + max(0.0, max_seconds))

    def _drain(self, deadline: float) -> int:
        sent = 0
        while True:
            rows = self._state.outbox_peek(self._window)
            if not rows:
                self._inflight.clear()
                return sent
            self._forget_missing(rows)
            if not self._inflight and not self._wait_connected(deadline):
                return sent
            if not self._publish_new(rows):
                return sent
            done = self._wait_prefix(rows, deadline)
            if not done:
                return sent
            self._state.outbox_delete(row.id for row in done)
            for row in done:
                tracking = self._inflight.pop(row.id)
                if tracking.refused:
                    self.refused += 1
                    log.warning("broker refused report %s on %s (reason code %s); dropped",
                                row.id, row.topic, tracking.reason_code)
            sent += len(done)
            if self._clock() >= deadline:
                return sent

    def _forget_missing(self, rows: list[OutboxItem]) -> None:
        """Drop in-flight entries for rows that left the outbox (trimmed by its cap)."""
        present = {row.id for row in rows}
        first = rows[0].id
        for row_id in [i for i in self._inflight if i < first or (i not in present and i <= rows[-1].id)]:
            del self._inflight[row_id]

    def _wait_connected(self, deadline: float) -> bool:
        return self._link.wait_connected(max(0.0, deadline - self._clock()))

    def _publish_new(self, rows: list[OutboxItem]) -> bool:
        """Publish the rows not yet in flight, in order; False when the link refuses (paho queue).

        Nothing new is published while a row published on an earlier connection is unacknowledged:
        paho is about to send it again, and a new row must not overtake it.
        """
        current = self._link.connections
        if any(t.connection < current and not t.acknowledged for t in self._inflight.values()):
            return True
        for row in rows:
            if row.id in self._inflight:
                continue
            if not self._link.connected:
                # paho would queue it and resend on reconnect, but new rows wait for a connection so
                # that memory stays bounded by the window.
                return bool(self._inflight)
            try:
                self._inflight[row.id] = self._link.publish(row.topic, row.payload, qos=max(1, row.qos),
                                                            retain=row.retain)
            except BrokerError as exc:
                log.warning("cannot publish report %s on %s: %s", row.id, row.topic, exc)
                return bool(self._inflight)
        return True

    def _wait_prefix(self, rows: list[OutboxItem], deadline: float) -> list[OutboxItem]:
        """Wait (until ``deadline``) for the oldest rows' acks; return the acknowledged prefix."""
        done: list[OutboxItem] = []
        for row in rows:
            tracking = self._inflight.get(row.id)
            if tracking is None:
                break
            while not tracking.acknowledged:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return done
                tracking.wait(min(remaining, _SLICE))
            done.append(row)
        return done

    def run(self, stop: threading.Event, *, idle_wait: float = _IDLE_WAIT,
            slice_seconds: float = 5.0) -> None:
        """Drain until ``stop`` is set: after every :meth:`notify`, and every ``idle_wait`` seconds.

        State errors are logged and retried after ``idle_wait``; nothing is raised.
        """
        while not stop.is_set():
            self._wake.clear()
            wait = idle_wait
            try:
                if self.drain(slice_seconds) > 0:
                    continue
                if self._state.outbox_count() > 0 and self._link.connected:
                    wait = _SLICE  # acknowledgements still to come: look again soon
            except StateError as exc:
                log.error("outbox: %s", exc)
            waited = 0.0
            while waited < wait and not stop.is_set() and not self._wake.is_set():
                self._wake.wait(min(_SLICE, wait - waited))
                waited += _SLICE
