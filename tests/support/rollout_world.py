"""A small registry world for the rollout runner's tests: devices registered online on release OLD,
the releases OLD and NEW recorded, and their reports ingested as the ingest writer commits them."""

from __future__ import annotations

from edge_core.messages import event_message, online_message, status_message
from fleet_server.store import FleetStore, IngestBatch

OLD, NEW = (1, "1" * 40), (2, "2" * 40)
T0 = 1_700_000_000.0
ONE_WAVE = {"waves": [{"name": "all", "percent": 100, "soak": 0, "timeout": 3600}], "canary_first": False}


class Clock:
    """A settable clock for the rollout runner (starts at T0)."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def status_of(store: FleetStore, devices: list[str], release: tuple[int, str], at: float, *,
            paused: bool = False) -> None:
    batch = IngestBatch()
    for d in devices:
        batch.add("status", status_message(d, commit=release[1], release=release[0], sync_state="in_sync",
                                           drift={}, paused=paused, ts=at), at)
    store.apply_batch(batch)


def fleet_of(store: FleetStore, n: int) -> list[str]:
    devices = [f"dev-{i:02d}" for i in range(n)]
    batch = IngestBatch()
    for d in devices:
        store.register_device(d, now=T0 - 100)
        batch.add("online", online_message(d, True, T0 - 90), T0 - 90)
    store.apply_batch(batch)
    status_of(store, devices, OLD, T0 - 80)
    for version, commit in (OLD, NEW):
        store.record_release(version, commit, ["ed25519:key"], T0 - 70)
    return devices


def succeeded(store: FleetStore, devices: list[str], at: float) -> None:
    batch = IngestBatch()
    for d in devices:
        batch.add("events", event_message(d, type="sync_succeeded", commit=NEW[1], release=NEW[0], ts=at), at)
    store.apply_batch(batch)
