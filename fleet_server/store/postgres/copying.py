"""The PostgreSQL store's part of ``fleet-server store copy`` (:mod:`fleet_server.store.copy`): whole
tables out through a server-side cursor in chunks, rows in with their own ids, then the id
generators moved past them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from psycopg.rows import tuple_row

from fleet_server.store.postgres.connection import PgConnections

__all__ = ["PgCopy"]

_IDENTITIES = ("events", "health", "audit", "rollout_gates", "notifications")
"""Tables whose ``id`` an identity generates."""


def _names(columns: Sequence[str]) -> str:
    return ", ".join(f'"{c}"' for c in columns)


class PgCopy(PgConnections):
    """Copying a whole PostgreSQL store out and in."""

    def dump_rows(self, table: str, columns: Sequence[str], chunk: int) -> Iterator[list[tuple[Any, ...]]]:
        """Yield every row of ``table`` (those ``columns``), ``chunk`` rows at a time.

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading(f"copy {table}") as conn, conn.transaction(), \
                conn.cursor(name=f"copy_{table}", row_factory=tuple_row) as cur:
            cur.execute(f"SELECT {_names(columns)} FROM {table}".encode())  # noqa: S608
            while rows := cur.fetchmany(chunk):
                yield rows

    def load_rows(self, table: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert ``rows`` into ``table`` in one transaction, with their own ids.

        Raises:
            StoreError: the database cannot be written.
        """
        marks = ", ".join(["%s"] * len(columns))
        with self._writing(f"copy {table}") as conn, conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {table} ({_names(columns)}) VALUES ({marks})".encode(), rows)  # noqa: S608

    def clear_table(self, table: str) -> None:
        """Delete every row of ``table``.

        Raises:
            StoreError: the database cannot be written.
        """
        with self._writing(f"clear {table}") as conn:
            conn.execute(f"DELETE FROM {table}".encode())  # noqa: S608

    def finish_load(self) -> None:
        """Move each identity and the registry change sequence past the largest copied value.

        Raises:
            StoreError: the database cannot be written.
        """
        with self._writing("move the id generators") as conn:
            for table in _IDENTITIES:
                conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"  # noqa: S608
                             f" coalesce(max(id), 1), max(id) IS NOT NULL) FROM {table}".encode())
            conn.execute("SELECT setval('device_changes_seq', coalesce(max(seq), 1), max(seq) IS NOT NULL)"
                         " FROM device_changes")
