"""The fleet store on both backends for tests: one parametrised fixture, real databases.

``store_config`` is a :class:`StoreConfig` for a new, empty store: an SQLite file in the test's
``tmp_path``, or a fresh database (copied from the migrated template) in the session's throwaway
PostgreSQL cluster (:mod:`tests.support.postgres`, started once per test process when the first
PostgreSQL test needs it). ``any_store`` is that store, opened, closed after the test. ``new_store``
is the module-scoped form for servers a module shares: a factory of new stores on each backend.
:func:`store_section` is the ``store:`` section of a ``server.yaml`` for it (tests that start
``fleet-server`` processes), :func:`select` reads its tables as a test checking what was stored does,
and :func:`run_sql` runs raw SQL against its database, as an operator or a fault would.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from fleet_server.config import StoreConfig
from fleet_server.store import FleetStore, open_store
from tests.support.postgres import Postgres

__all__ = ["any_store", "new_store", "postgres_cluster", "run_sql", "select", "store_config", "store_section"]

BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Postgres]:
    """One throwaway PostgreSQL cluster for the test process, stopped by pid at the end."""
    with Postgres() as pg:
        yield pg


@pytest.fixture(params=BACKENDS)
def store_config(request: pytest.FixtureRequest, tmp_path: Path) -> StoreConfig:
    """The configuration of a new, empty store on each backend."""
    if request.param == "sqlite":
        return StoreConfig(path=tmp_path / "fleet.db")
    pg: Postgres = request.getfixturevalue("postgres_cluster")
    return StoreConfig(url=pg.create_database(), password_file=pg.password_file)


@pytest.fixture(scope="module", params=BACKENDS)
def new_store(request: pytest.FixtureRequest,
              tmp_path_factory: pytest.TempPathFactory) -> Callable[[], StoreConfig]:
    """For a module's shared servers: makes new, empty stores on one backend, each backend in turn."""
    if request.param == "sqlite":
        return lambda: StoreConfig(path=tmp_path_factory.mktemp("store") / "fleet.db")
    pg: Postgres = request.getfixturevalue("postgres_cluster")
    return lambda: StoreConfig(url=pg.create_database(), password_file=pg.password_file)


@pytest.fixture
def any_store(store_config: StoreConfig) -> Iterator[FleetStore]:
    """The store of ``store_config``, opened (schema migrated) and closed after the test."""
    store = open_store(store_config)
    yield store
    store.close()


def run_sql(config: StoreConfig, *, sqlite: str, postgresql: str) -> None:
    """Run ``sqlite`` or ``postgresql`` (by the store's backend) in the store's database and commit."""
    if config.backend == "sqlite":
        conn = sqlite3.connect(config.path)
        try:
            conn.executescript(sqlite)
            conn.commit()
        finally:
            conn.close()
        return
    assert config.password_file is not None
    password = config.password_file.read_text().strip()
    with psycopg.connect(config.url, password=password, autocommit=True) as pg:
        pg.execute(postgresql.encode())


def store_section(config: StoreConfig) -> dict[str, str]:
    """The ``store:`` section of a ``server.yaml`` that opens ``config``'s store."""
    if config.backend == "sqlite":
        return {"path": str(config.path)}
    return {"url": config.url, "password_file": str(config.password_file)}


def select(config: StoreConfig, sql: str) -> list[tuple[Any, ...]]:
    """The rows of one read-only query (no parameters; SQL both backends accept) on the store's database."""
    if config.backend == "sqlite":
        conn = sqlite3.connect(f"file:{config.path}?mode=ro", uri=True, timeout=10)
        try:
            return [tuple(row) for row in conn.execute(sql)]
        finally:
            conn.close()
    assert config.password_file is not None
    password = config.password_file.read_text().strip()
    with psycopg.connect(config.url, password=password, autocommit=True) as pg:
        return [tuple(row) for row in pg.execute(sql.encode())]
