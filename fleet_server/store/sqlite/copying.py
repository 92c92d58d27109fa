"""The SQLite store's part of ``fleet-server store copy`` (:mod:`fleet_server.store.copy`): whole
tables out in chunks, rows in with their own ids."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from fleet_server.store.sqlite.connection import SqliteConnections

__all__ = ["SqliteCopy"]


def _names(columns: Sequence[str]) -> str:
    return ", ".join(f"[{c}]" for c in columns)


class SqliteCopy(SqliteConnections):
    """Copying a whole SQLite store out and in."""

    @property
    def where(self) -> str:
        """The store's URL, for messages."""
        return f"sqlite://{self.path}"

    def dump_rows(self, table: str, columns: Sequence[str], chunk: int) -> Iterator[list[tuple[Any, ...]]]:
        """Yield every row of ``table`` (those ``columns``), ``chunk`` rows at a time.

        Raises:
            StoreError: the database cannot be read.
        """
        with self._reading(f"copy {table}") as conn:
            cur = conn.execute(f"SELECT {_names(columns)} FROM {table}")  # noqa: S608
            while rows := cur.fetchmany(chunk):
                yield [tuple(r) for r in rows]

    def load_rows(self, table: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert ``rows`` into ``table`` in one transaction, with their own ids.

        Raises:
            StoreError: the database cannot be written.
        """
        marks = ", ".join("?" * len(columns))
        with self._writing(f"copy {table}"), self._db.atomic():
            self._wconn.executemany(f"INSERT INTO {table} ({_names(columns)}) VALUES ({marks})", rows)  # noqa: S608

    def clear_table(self, table: str) -> None:
        """Delete every row of ``table``.

        Raises:
            StoreError: the database cannot be written.
        """
        with self._writing(f"clear {table}"), self._db.atomic():
            self._wconn.execute(f"DELETE FROM {table}")  # noqa: S608

    def finish_load(self) -> None:
        """Nothing to do: SQLite's next ids follow the largest ones stored."""
