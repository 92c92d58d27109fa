"""``fleet-server store copy``: move a fleet's state from one store to another, across backends.

Every table of the schema is copied row by row with its ids (events, health samples, audit entries
and gate decisions keep their numbers, so the rollout runner's stored cursor stays right), in chunks
of :data:`CHUNK` rows, streamed from the source. Both stores are opened (so both are migrated to
the newest schema) before anything is copied, and the destination must be empty: copying into a
store that already holds a fleet would mix two histories. A copy that fails half-way leaves a
partial destination; drop it and copy again.
"""

from __future__ import annotations

from fleet_server.errors import StoreError
from fleet_server.store.interfaces import CopyStore
from fleet_server.store.records import DEVICE_COLUMNS

__all__ = ["CHUNK", "OWN_TABLES", "TABLES", "copy_store"]

CHUNK = 5000

TABLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("meta", ("key", "value")),
    ("devices", DEVICE_COLUMNS),
    ("device_changes", ("seq", "device")),
    ("releases", ("version", "commit", "signers", "seen_at", "committed_at")),
    ("events", ("id", "device", "ts", "received_at", "type", "commit", "release", "reason", "step", "detail",
                "committed_at")),
    ("health", ("id", "device", "ts", "received_at", "metrics", "checks")),
    ("audit", ("id", "at", "actor", "action", "target", "reason", "detail")),
    ("counters", ("name", "value")),
    ("rollout_records", ("id", "release", "commit", "previous", "plan", "state", "phase", "wave", "actor",
                         "reason", "created", "updated")),
    ("rollout_devices", ("rollout_id", "device", "wave", "state", "data")),
    ("rollout_assignments", ("device", "rollout_id", "release", "commit", "assigned_at", "published_at")),
    ("rollout_gates", ("id", "rollout_id", "wave", "at", "passed", "detail")),
    ("rollout_samples", ("rollout_id", "wave", "ts", "done", "failed", "pending", "offline", "deferred",
                         "skipped")),
    ("notifications", ("id", "event_id", "receiver", "event", "body", "created", "state", "attempts",
                       "next_attempt", "last_attempt", "last_status", "last_error", "delivered_at")),
)
"""Every table of the schema (but :data:`OWN_TABLES`) with its columns, in copy order."""

OWN_TABLES = ("schema_migrations", "leader_term")
"""Tables each store keeps for itself: its migrations and its leadership term (a copy starts its own
terms from 0, with the replicas that will lead it)."""

_OWN_META = frozenset({"schema"})
"""``meta`` keys each store keeps for itself."""


def _is_empty(store: CopyStore) -> bool:
    columns = dict(TABLES)
    for table in ("devices", "events", "health", "audit", "releases", "rollout_records"):
        for chunk in store.dump_rows(table, columns[table][:1], 1):
            if chunk:
                return False
    return True


def copy_store(source: CopyStore, dest: CopyStore) -> dict[str, int]:
    """Copy every table of ``source`` into the empty ``dest``; return the rows copied per table.

    Raises:
        StoreError: ``dest`` is not empty, or either store cannot be read or written.
    """
    if not _is_empty(dest):
        raise StoreError(f"the destination store {dest.where} is not empty: copy into a new database")
    counts: dict[str, int] = {}
    for table, columns in TABLES:
        if table == "device_changes":
            dest.clear_table(table)  # the rows the devices' insert trigger just made
        n = 0
        for chunk in source.dump_rows(table, columns, CHUNK):
            rows = [r for r in chunk if r[0] not in _OWN_META] if table == "meta" else chunk
            if rows:
                dest.load_rows(table, columns, rows)
            n += len(rows)
        counts[table] = n
    dest.finish_load()
    return counts
