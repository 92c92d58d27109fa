"""The backend-neutral records of webhook deliveries: what an enqueue writes and the delivery states."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DELIVERY_STATES", "NewDelivery"]

DELIVERY_STATES = ("pending", "delivered", "failed")
"""``pending`` (not delivered yet: due at ``next_attempt``), ``delivered`` (a 2xx answer), ``failed``
(given up: the receiver refused it for good or it stayed undelivered past the retry window)."""


@dataclass(frozen=True)
class NewDelivery:
    """One delivery to enqueue: the event for one receiver, with the body exactly as it will be sent."""

    event_id: str
    receiver: str
    event: str
    body: str
    created: float
