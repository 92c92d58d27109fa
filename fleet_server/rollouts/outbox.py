"""The assignment outbox: carries ``rollout_assignments`` rows written unpublished to the broker.

An assignment row is written unpublished in the same transaction as the rollout state that made it
(:mod:`.runner`). :meth:`AssignmentOutbox.flush` publishes every unpublished row as the device's
retained QoS 1 ``desired`` message; a row is marked published only once the broker acknowledged it
(PUBACK), by :meth:`AssignmentOutbox.settle`. A row whose message was queued but not yet acknowledged
when the server stops (or crashes, or loses the broker for good) therefore stays unpublished and is
published again, the same assignment, after the next load: at least once, never a different release.

While a message is in flight its row is not published a second time; when the broker has not
acknowledged it within ``resend_after`` seconds (the connection died and the client's own queue may
have lost it), the row is published again. A publisher that returns no acknowledgement handle
(an in-process stand-in) counts as acknowledged at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from edge_core.errors import MessageError
from fleet_server.errors import BrokerError
from fleet_server.store import FleetStore

__all__ = ["Acknowledgement", "AssignmentOutbox", "PublishDesired"]

log = logging.getLogger(__name__)

RESEND_AFTER = 60.0
"""Seconds an assignment may wait for the broker's acknowledgement before it is published again."""


class Acknowledgement(Protocol):
    """What a publish returns to tell when the broker acknowledged it (``paho``'s message info)."""

    def is_published(self) -> bool:
        """Return whether the broker acknowledged the message (raise when it can no longer be)."""
        ...


PublishDesired = Callable[[str, str, int, str | None], Acknowledgement | None]
"""``publish_desired(device_id, revision, release, rollout_id)``: publish one retained assignment;
returns a handle that tells when the broker acknowledged it, or None when it already is."""

Key = tuple[str, int, str]
"""An assignment row: ``(device, release, rollout_id)``."""


class AssignmentOutbox:
    """Publishes unpublished assignment rows and marks them published once acknowledged (see the
    module docstring). Not thread-safe: the runner calls it under its lock.

    Args:
        store: the fleet database holding ``rollout_assignments``.
        publish: publishes one retained ``desired`` message.
        clock: returns POSIX time (when a row was published, for ``resend_after``).
        resend_after: seconds without acknowledgement after which a row is published again.
    """

    def __init__(self, store: FleetStore, publish: PublishDesired, clock: Callable[[], float], *,
                 resend_after: float = RESEND_AFTER) -> None:
        self._store = store
        self._publish = publish
        self._clock = clock
        self._resend_after = resend_after
        self._inflight: dict[Key, tuple[Acknowledgement, float]] = {}

    @property
    def in_flight(self) -> int:
        """How many published assignments wait for the broker's acknowledgement."""
        return len(self._inflight)

    def flush(self) -> None:
        """Publish every unpublished assignment not already waiting for its acknowledgement, then
        mark what the broker acknowledged.

        Raises:
            StoreError: the database cannot be read or written.
        """
        now = self._clock()
        done: list[Key] = []
        for row in self._store.assignments(unpublished=True):
            key = (str(row["device"]), int(row["release"]), str(row["rollout_id"]))
            if key in self._inflight:
                continue
            try:
                ack = self._publish(key[0], str(row["commit"]), key[1], key[2])
            except (BrokerError, MessageError) as exc:
                log.warning("cannot publish the assignment of %s (retried next tick): %s", key[0], exc)
                continue
            if ack is None:
                done.append(key)
            else:
                self._inflight[key] = (ack, now)
        self._mark(done)
        self.settle()

    def settle(self) -> None:
        """Mark the assignments the broker acknowledged since the last call as published; forget the
        ones that waited longer than ``resend_after`` (or failed), so the next flush publishes them
        again. Returns at once when nothing is in flight.

        Raises:
            StoreError: the database cannot be written.
        """
        if not self._inflight:
            return
        now = self._clock()
        done: list[Key] = []
        expired = dropped = 0
        for key, (ack, since) in list(self._inflight.items()):
            failed = False
            try:
                acknowledged = ack.is_published()
            except (RuntimeError, ValueError) as exc:
                log.warning("the assignment of %s was not published (published again): %s", key[0], exc)
                acknowledged, failed = False, True
            if acknowledged:
                done.append(key)
                del self._inflight[key]
            elif failed or now - since >= self._resend_after:
                expired += not failed
                dropped += 1
                del self._inflight[key]
        if expired:
            log.warning("%s assignment(s) not acknowledged by the broker within %.0fs; published again",
                        expired, self._resend_after)
        self._mark(done)
        if dropped:
            self.flush()

    def _mark(self, done: list[Key]) -> None:
        if done:
            self._store.mark_published(done, self._clock())
