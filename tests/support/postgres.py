"""A throwaway PostgreSQL cluster on loopback for tests: ``initdb`` in a temporary directory, the
``postgres`` server on a free 127.0.0.1 port with ``fsync=off`` (``durable=True``: its durable
defaults, for benchmarks), stopped by its pid.

    with Postgres() as pg:
        url = pg.create_database()        # a fresh database, copied from the migrated template
        store = open_store(StoreConfig(url=url, password_file=pg.password_file))

The cluster's superuser is ``fleet`` with a password (in ``password_file``): connections over TCP
authenticate with SCRAM, as a production server's would. ``create_database`` copies a template that
holds the current schema (``CREATE DATABASE ... TEMPLATE``), so every test starts from an empty,
migrated store in a few milliseconds; ``create_database(migrated=False)`` gives an empty one.

Run as root (CI, the developers' machines), the cluster runs as the ``postgres`` user, because
``initdb`` refuses root. The binaries come from PATH or ``/usr/lib/postgresql/*/bin``; when they
are missing the test is skipped, except under ``CI=true``, where it fails: the test command
installs Debian's ``postgresql`` package (``tools/ensure-system-packages.sh``).
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psycopg
import pytest

from fleet_server.config import StoreConfig
from fleet_server.store import open_store
from tests.support.mirror import free_port, wait_for_port

__all__ = ["Postgres", "postgres_bin"]

_START_WAIT = 30.0
_STOP_WAIT = 10.0
_TEMPLATE = "fleet_template"


def postgres_bin(name: str) -> str:
    """Return the path of a PostgreSQL server program; skip (fail under ``CI=true``) when absent."""
    found = shutil.which(name)
    if found is None:
        candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
        found = candidates[-1] if candidates else None
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL's {name} is not installed (make sysdeps installs it)")
        pytest.skip(f"PostgreSQL's {name} is not installed")
    return found


class Postgres:
    """One PostgreSQL cluster in a temporary directory (see the module docstring)."""

    def __init__(self, *, durable: bool = False) -> None:
        self.durable = durable  # False: no fsync (tests); True: PostgreSQL's durable defaults (benchmarks)
        self.port = free_port()
        self.password = "test-" + os.urandom(8).hex()
        self._dir = Path(tempfile.mkdtemp(prefix="fleet-pg-"))
        self.password_file = self._dir / "password"
        self._proc: subprocess.Popen[bytes] | None = None
        self._names = itertools.count(1)
        self._run_as: dict[str, Any] = {}
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            self._run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
            os.chown(self._dir, user.pw_uid, user.pw_gid)

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory."""
        return self._dir / "data"

    def url(self, database: str) -> str:
        """Return the ``postgresql://`` URL of ``database`` (no password in it)."""
        return f"postgresql://fleet@127.0.0.1:{self.port}/{database}"

    def start(self) -> Self:
        """initdb, then start the server and wait until it accepts connections."""
        initdb, server = postgres_bin("initdb"), postgres_bin("postgres")
        pwfile = self._dir / "initdb-password"
        pwfile.write_text(self.password + "\n")
        if self._run_as:
            os.chown(pwfile, self._run_as["user"], self._run_as["group"])
        subprocess.run([initdb, "-D", str(self.data_dir), "-U", "fleet", "--pwfile", str(pwfile),
                        "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C",
                        "--no-sync"],
                       check=True, capture_output=True, timeout=120, **self._run_as)
        pwfile.unlink()
        self.password_file.write_text(self.password + "\n")
        self.password_file.chmod(0o600)
        self._launch(server)
        self._create_template()
        return self

    def _launch(self, server: Path | str) -> None:
        """Start the server on the initialised data directory and wait until it accepts a login."""
        log = open(self._dir / "postgres.log", "ab")  # noqa: SIM115 - the server writes it until stopped
        try:
            self._proc = subprocess.Popen(
                [server, "-D", str(self.data_dir), "-p", str(self.port), "-c", "listen_addresses=127.0.0.1",
                 "-c", f"unix_socket_directories={self._dir}", "-c", "max_connections=200",
                 *([] if self.durable else ["-c", "fsync=off", "-c", "synchronous_commit=off",
                                            "-c", "full_page_writes=off"])],
                stdout=log, stderr=subprocess.STDOUT, **self._run_as)
        finally:
            log.close()
        self._wait_ready()

    def restart(self, down: float) -> None:
        """Stop the server (fast shutdown, by pid), keep it down ``down`` seconds, start it again on
        the same data and port, and wait until it accepts a login."""
        self._shut_down()
        time.sleep(down)
        self._launch(postgres_bin("postgres"))

    def _wait_ready(self) -> None:
        """Wait until the server accepts a login (it listens before recovery ends), within a bound."""
        deadline = time.monotonic() + _START_WAIT
        try:
            wait_for_port(self.port, timeout=_START_WAIT, alive=lambda: self._proc is not None
                          and self._proc.poll() is None)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {self.log_tail()}") from exc
        while True:
            try:
                self._admin("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL did not accept a login: {exc}: "
                                       f"{self.log_tail()}") from exc
                time.sleep(0.05)

    def log_tail(self) -> str:
        """Return the end of the server's log (for failure messages)."""
        try:
            return (self._dir / "postgres.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def _admin(self, sql: str, database: str = "postgres") -> None:
        with psycopg.connect(host="127.0.0.1", port=self.port, user="fleet", password=self.password,
                             dbname=database, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql)

    def _create_template(self) -> None:
        self._admin(f"CREATE DATABASE {_TEMPLATE}")
        store = open_store(StoreConfig(url=self.url(_TEMPLATE), password_file=self.password_file))
        store.close()

    def create_database(self, *, migrated: bool = True) -> str:
        """Create a new database (the current schema in it unless ``migrated`` is False); return its URL."""
        name = f"test_{next(self._names)}"
        self._admin(f"CREATE DATABASE {name} TEMPLATE {_TEMPLATE if migrated else 'template0'}")
        return self.url(name)

    def _shut_down(self) -> None:
        """Stop the server by its pid: fast shutdown, then SIGKILL after a bound."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(_STOP_WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(_STOP_WAIT)

    def stop(self) -> None:
        """Stop the server by its pid (fast shutdown, then SIGKILL after a bound) and remove the files."""
        self._shut_down()
        deadline = time.monotonic() + _STOP_WAIT
        while True:
            try:
                shutil.rmtree(self._dir)
                break
            except OSError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
