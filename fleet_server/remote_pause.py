"""The fleet server's break-glass: pause or resume devices remotely (``fleetctl device pause``).

A remote pause is the device's retained ``control`` message (``<prefix>/<device>/control``,
``paused: true`` with the operator's reason); resuming publishes ``paused: false`` in its place.
The broker keeps it (retained, persisted), so a device gets it on every connect and an agent
restarted while paused stays paused; the agent keeps it in its state database as well. It is the
same pause as ``edge-agent pause`` and composes with it: the device applies nothing, drift
correction included, while either stands, and keeps reporting. Each pause and resume is audited
(``device.pause`` / ``device.resume``, target ``device/<id>``). The rollout engine sees the pause in
the device's status (``paused``), and treats the device as it treats an offline one.

Any replica may pause or resume: the message is retained and idempotent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from fleet_server.errors import BrokerError, UsageError

__all__ = ["PUBLISH_WAIT", "RemotePause"]

log = logging.getLogger(__name__)

PUBLISH_WAIT = 5.0
"""Seconds a pause or resume waits for the broker to acknowledge each ``control`` message."""

PublishControl = Callable[[str, bool, str | None], None]
"""``publish(device, paused, reason)``: publish one retained ``control`` message and wait for the
broker's acknowledgement (raises BrokerError)."""


class PauseStore(Protocol):
    """What a remote pause needs of the store."""

    def device(self, device_id: str) -> dict[str, Any] | None:
        """Return one device row, or None."""
        ...

    def add_audit(self, actor: str, action: str, target: str, reason: str,
                  detail: Mapping[str, Any] | None = None, *, now: float | None = None) -> None:
        """Append one audit row."""
        ...


class RemotePause:
    """Pauses and resumes devices by their retained ``control`` message (see the module docstring).

    Args:
        store: where the devices are known and the actions audited.
        publish: publishes one device's ``control`` message and waits for the broker.
    """

    def __init__(self, store: PauseStore, publish: PublishControl) -> None:
        self._store = store
        self._publish = publish

    def set(self, devices: Sequence[str], *, paused: bool, reason: str, actor: str,
            known: bool = False) -> list[str]:
        """Pause (``paused``) or resume every device of ``devices``; return the ids done, in order.
        ``known``: the ids come from the registry itself (a selector), so they are not looked up again.

        Raises:
            UsageError: no device given, an unknown device, or a pause without a reason.
            BrokerError: the broker did not take one of the messages (the devices before it are
                done and audited; none after it is).
        """
        if not devices:
            raise UsageError("no device matches")
        if paused and not reason.strip():
            raise UsageError("a pause needs a reason")
        unknown = [] if known else [d for d in devices if self._store.device(d) is None]
        if unknown:
            raise UsageError(f"unknown device {unknown[0]}")
        done: list[str] = []
        action = "device.pause" if paused else "device.resume"
        for device in devices:
            try:
                self._publish(device, paused, reason.strip() or None)
            except BrokerError as exc:
                done_text = f"{len(done)} of {len(devices)} done"
                raise BrokerError(f"{action} of {device}: {exc} ({done_text})") from exc
            self._store.add_audit(actor, action, f"device/{device}", reason.strip(), {"paused": paused})
            done.append(device)
        why = f" ({reason.strip()})" if reason.strip() else ""
        log.warning("%s by %s: %s device(s)%s", action, actor, len(done), why)
        return done
