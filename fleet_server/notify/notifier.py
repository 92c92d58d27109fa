"""The :class:`Notifier`: enqueues each event for the receivers that subscribed to it (one insert,
from whichever thread reports it) and delivers the stored notifications from its own thread, so a
dead or slow receiver never delays ingest, the rollout runner or the Git watcher.

Delivery is at least once: a notification stays ``pending`` in the store until a receiver answers
2xx, across restarts; each retry waits an exponentially growing, jittered delay (equal jitter: a
uniform draw from the upper half of ``min(cap, base * 2**attempts)``); past the receiver's
``retry_for`` it is given up (``failed``). When an attempt fails, the receiver's other due
deliveries wait for the same time, so a dead or hanging receiver costs one attempt per back-off,
not one per queued notification, and the other receivers are not held behind it. The worker also
turns the store's new device events and long-offline devices into notifications
(:mod:`.sources`), at most every ``scan_interval``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from fleet_server.errors import StoreError
from fleet_server.metrics_notify import NotificationMetrics
from fleet_server.notify.config import Receiver
from fleet_server.notify.sender import PostResult, post
from fleet_server.notify.signing import body_text, read_secret, request_headers
from fleet_server.notify.sources import Pending, device_event, gate_events, offline_event, phase_event
from fleet_server.rollouts.model import RolloutState
from fleet_server.store import FleetStore, NewDelivery, RolloutWrite

__all__ = ["Notifier", "event_id"]

log = logging.getLogger(__name__)

_NAMESPACE = uuid.UUID("6f0c3f5e-58a4-4d0e-9d6a-8f3b2a1e7c11")
_EVENTS_PAGE = 1000
_PAGES_PER_SCAN = 20
_OFFLINE_LOOKBACK = 86400.0
"""At start, devices that went offline up to this long before a receiver's threshold are considered
(those already notified are not sent again: their event ids are stored)."""

Poster = Callable[[str, bytes, Mapping[str, str], float], PostResult]


def event_id(key: str) -> str:
    """Return the event id of a deduplication key: the same key always gives the same id."""
    return str(uuid.uuid5(_NAMESPACE, key))


def _default_post(url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> PostResult:
    return post(url, body, headers, timeout=timeout)


class Notifier:
    """Webhook notifications of one fleet server (see the module docstring).

    Args:
        receivers: the ``notifications`` of ``server.yaml``.
        store: where deliveries are kept, and the event history and registry the worker scans.
        metrics: attempt and state collectors (none when None).
        clock: the current time in seconds.
        rng: the jitter's random source.
        scan_interval: seconds between looks at new device events and offline devices.
        backoff_base: ceiling, in seconds, of the first retry delay.
        backoff_cap: largest ceiling of a retry delay, in seconds.

    Raises:
        ServerConfigError: a receiver's ``secret_file`` cannot be read, is empty or too large.
    """

    def __init__(self, receivers: Sequence[Receiver], store: FleetStore, *,
                 metrics: NotificationMetrics | None = None, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None, scan_interval: float = 5.0, backoff_base: float = 5.0,
                 backoff_cap: float = 900.0, sender: Poster = _default_post) -> None:
        self._receivers = {r.name: r for r in receivers}
        self._secrets: dict[str, bytes | None] = {}
        for i, r in enumerate(receivers):
            key = f"notifications[{i}].secret_file"
            self._secrets[r.name] = None if r.secret_file is None else read_secret(r.secret_file, key)
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 - jitter, not secrets
        self._scan_interval = scan_interval
        self._base, self._cap = backoff_base, backoff_cap
        self._send = sender
        self._next_scan = 0.0
        self._offline_seen: dict[str, float] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- enqueueing (any thread) -----------------------------------------------------------------

    def notify(self, event: str, data: Mapping[str, Any], *, key: str | None = None,
               at: float | None = None) -> int:
        """Enqueue ``event`` with ``data`` for every receiver subscribed to it (one insert); return how
        many deliveries were added. ``key`` deduplicates: the same key is stored once per receiver.
        Never raises: a store failure is logged and the event is lost (0)."""
        when = self._clock() if at is None else at
        return self._enqueue([Pending(event, key or f"{event}:{uuid.uuid4()}", when, dict(data))])

    def refusal_hook(self, event: str, data: Mapping[str, Any]) -> None:
        """The Git watcher's ``notify`` hook: enqueue ``event`` once per refused commit (a restart
        that judges the same head again sends nothing new)."""
        self.notify(event, data, key=f"{event}:{data.get('commit')}")

    def on_phase(self, state: RolloutState, old_phase: str) -> None:
        """The rollout runner's phase listener: enqueue the event of a committed phase change."""
        pending = phase_event(state, old_phase, self._clock())
        if pending is not None:
            self._enqueue([pending])

    def on_commit(self, write: RolloutWrite) -> None:
        """The rollout runner's commit listener: enqueue ``rollout.wave_passed`` for passed gates."""
        self._enqueue(gate_events(write.gates))

    def _enqueue(self, pendings: Iterable[Pending], only: Receiver | None = None) -> int:
        """Store ``pendings`` (logging a store failure: 0 added)."""
        try:
            return self._store_pending(pendings, only)
        except StoreError as exc:
            log.error("notifications not stored: %s", exc)
            return 0

    def _store_pending(self, pendings: Iterable[Pending], only: Receiver | None = None) -> int:
        rows: list[NewDelivery] = []
        for p in pendings:
            eid = event_id(p.key)
            body = body_text(eid, p.event, p.at, p.data)
            targets = [only] if only is not None else self._receivers.values()
            rows.extend(NewDelivery(event_id=eid, receiver=r.name, event=p.event, body=body, created=p.at)
                        for r in targets if r.wants(p.event))
        if not rows:
            return 0
        added = self._store.enqueue_deliveries(rows)
        if added:
            self._wake.set()
        return added

    # -- the worker ------------------------------------------------------------------------------

    def scan(self, now: float) -> int:
        """Enqueue notifications for the device events stored since the last scan and for devices
        offline longer than a receiver's ``offline_after``; return how many deliveries were added.

        Raises:
            StoreError: the store cannot be read (the cursor stays: the next scan retries).
        """
        added = 0
        cursor = self._store.notify_cursor()
        if cursor is None:  # first start: only what happens from now on
            cursor = int(self._store.history_heads().get("events", 0))
            self._store.set_notify_cursor(cursor)
        for _ in range(_PAGES_PER_SCAN):
            rows = self._store.events_after(cursor, _EVENTS_PAGE)
            if not rows:
                break
            added += self._store_pending(p for p in map(device_event, rows) if p is not None)
            cursor = int(rows[-1]["id"])
            self._store.set_notify_cursor(cursor)
        for r in self._receivers.values():
            if r.wants("device.offline"):
                before = now - r.offline_after
                since = self._offline_seen.get(r.name, before - _OFFLINE_LOOKBACK)
                offline = self._store.offline_devices(before, since, _EVENTS_PAGE)
                added += self._store_pending([offline_event(row, now) for row in offline], only=r)
                # a full page: read on from its last device next time, else from this threshold
                self._offline_seen[r.name] = float(offline[-1]["online_ts"]) if len(offline) >= _EVENTS_PAGE \
                    else before
        return added

    def _delay(self, attempts: int) -> float:
        ceiling = min(self._cap, self._base * 2.0 ** min(attempts, 60))
        return self._rng.uniform(ceiling / 2, ceiling)

    def deliver_due(self, now: float, limit: int = 50) -> int:
        """Attempt every delivery due at ``now`` (at most ``limit``); return how many were attempted.

        Raises:
            StoreError: the store cannot be read or written.
        """
        due = self._store.due_deliveries(now, limit)
        postponed: set[str] = set()
        for row in due:
            if self._stopping.is_set():
                break
            if str(row["receiver"]) not in postponed and self._attempt(row):
                postponed.add(str(row["receiver"]))
        return len(due)

    def _attempt(self, row: Mapping[str, Any]) -> bool:
        """Attempt one delivery; return True when it failed and its receiver's due ones were postponed."""
        receiver = self._receivers.get(str(row["receiver"]))
        now = self._clock()
        if receiver is None:
            self._store.record_attempt(int(row["id"]), at=now, state="failed", status=None,
                                       error="receiver no longer configured", next_attempt=now)
            return False
        body = str(row["body"]).encode("utf-8")
        headers = request_headers(event=str(row["event"]), event_id=str(row["event_id"]), body=body,
                                  secret=self._secrets.get(receiver.name), sent_at=now)
        result = self._send(receiver.url, body, headers, receiver.timeout)
        done = self._clock()
        if result.ok:
            state, outcome, next_at = "delivered", "delivered", done
        elif done - float(row["created"]) >= receiver.retry_for:
            state, outcome, next_at = "failed", "failed", done
        else:
            state, outcome, next_at = "pending", "retried", done + self._delay(int(row["attempts"]))
        self._store.record_attempt(int(row["id"]), at=done, state=state, status=result.status,
                                   error=result.error, next_attempt=next_at)
        if state == "pending":  # its other due deliveries wait with it: one failing attempt per back-off
            self._store.postpone_receiver(receiver.name, done, next_at)
        if self._metrics is not None:
            self._metrics.attempted(receiver.name, outcome)
        if not result.ok:
            log.warning("notification %s (%s) to %s: %s; %s", row["event_id"], row["event"], receiver.name,
                        result.error, "given up" if state == "failed" else "retried later")
        return state == "pending"

    def run_once(self) -> None:
        """One pass of the worker: scan when due, then deliver what is due (store errors logged)."""
        now = self._clock()
        try:
            if now >= self._next_scan:
                self._next_scan = now + self._scan_interval
                self.scan(now)
                if self._metrics is not None:
                    self._metrics.set_states(self._store.delivery_counts())
            while self.deliver_due(self._clock()) and not self._stopping.is_set():
                pass
        except StoreError as exc:
            log.error("notifications: %s", exc)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self.run_once()
            self._wake.wait(1.0)
            self._wake.clear()

    def start(self) -> None:
        """Start the delivery thread (again after :meth:`stop`: a replica that regains the leadership);
        nothing when it runs."""
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="notifier", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the delivery thread: an attempt under way finishes (bounded by its receiver's timeout);
        what is not delivered stays pending in the store for the next start. Idempotent."""
        self._stopping.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            timeout = max((r.timeout for r in self._receivers.values()), default=0.0)
            thread.join(timeout=3 * timeout + 5.0)
