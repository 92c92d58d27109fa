"""A real Mosquitto on loopback for tests, with persistence so that a restart keeps its state.

    with Mosquitto(tmp_path / "broker") as broker:
        settings = MqttSettings(host="127.0.0.1", port=broker.port, device_id="dev-1")

The broker listens on 127.0.0.1 on a free port (kept across :meth:`Mosquitto.restart`), keeps its
database in its work directory (retained messages and the queued QoS 1 messages of persistent
sessions survive a restart: SIGTERM makes Mosquitto save it), and logs to ``mosquitto.log`` there.
By default anonymous clients are allowed; with ``password_file`` and ``acl_file`` it authenticates
and authorises. ``base_config`` replaces the generated listener and auth lines with given text
(for example the snippet ``fleetctl broker-config`` writes); it must open a listener on
127.0.0.1 at ``port``. Its ``persistence_location`` line, if any, is dropped: the database always
stays in the work directory.

The process is stopped by its pid (SIGTERM, then SIGKILL after a bound), never by name. The pytest
fixture ``broker`` gives a started broker to one test function.

The other side of a test talks through Mosquitto's own command-line clients, independent of the
code under test: :class:`Subscriber` runs ``mosquitto_sub`` (stopped by pid) and collects what it
receives; :func:`publish` runs ``mosquitto_pub`` once.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

from tests.support.mirror import free_port, wait_for_port

__all__ = ["Mosquitto", "Received", "Subscriber", "broker", "mosquitto_binary", "publish"]

_STOP_WAIT = 5.0


def mosquitto_binary() -> str:
    """Return the path of the ``mosquitto`` executable, or skip the test when it is not installed."""
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK)
                                          else None)
    if found is None:
        pytest.skip("mosquitto is not installed")
    return found


class Mosquitto:
    """A Mosquitto process on 127.0.0.1 with its own config, database and log in ``workdir``."""

    def __init__(self, workdir: Path, *, port: int | None = None, password_file: Path | None = None,
                 acl_file: Path | None = None, base_config: str | None = None,
                 extra_lines: Sequence[str] = ()) -> None:
        self.workdir = Path(workdir)
        self.port = port if port is not None else free_port()
        self.password_file = password_file
        self.acl_file = acl_file
        self.base_config = base_config
        self.extra_lines = tuple(extra_lines)
        self.conf_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def _config(self) -> str:
        # As root, Mosquitto drops privileges to "mosquitto" unless told to stay the current user.
        lines = [f"user {pwd.getpwuid(os.getuid()).pw_name}"]
        if self.base_config is not None:
            # the database stays in the work directory: a given persistence_location is replaced
            lines += [line for line in self.base_config.strip().splitlines()
                      if not line.startswith("persistence_location")]
        else:
            lines += ["per_listener_settings false", f"listener {self.port} 127.0.0.1"]
            if self.password_file is not None:
                lines += ["allow_anonymous false", f"password_file {self.password_file}"]
            else:
                lines.append("allow_anonymous true")
            if self.acl_file is not None:
                lines.append(f"acl_file {self.acl_file}")
        lines += [
            "persistence true",
            f"persistence_location {self.workdir}/",
            "autosave_interval 1",
            "max_queued_messages 10000",
            f"log_dest file {self.log_path}",
            "log_type all",
            *self.extra_lines,
        ]
        return "\n".join(lines) + "\n"

    def start(self) -> Self:
        """Write the config, start Mosquitto and wait (at most 10 s) until it accepts connections.

        Raises:
            RuntimeError: it exited or did not listen in time (the log tail is in the message).
        """
        if self._proc is not None:
            raise RuntimeError("mosquitto is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(self._config(), encoding="utf-8")
        self._proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf_path)],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        proc = self._proc
        try:
            wait_for_port(self.port, timeout=10.0, alive=lambda: proc.poll() is None)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{exc}; log: {self.log_tail()}") from exc
        return self

    def stop(self) -> None:
        """SIGTERM the broker by pid (it saves its database), SIGKILL after 5 s; idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=_STOP_WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=_STOP_WAIT)

    def restart(self) -> None:
        """Stop and start again on the same port with the same database."""
        self.stop()
        self.start()

    @property
    def pid(self) -> int | None:
        """The process id while running."""
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        """Return the last ``lines`` lines of the broker's log (for failure messages)."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A started anonymous Mosquitto on a free loopback port, stopped (by pid) after the test; up to
    1,000 QoS 1 messages in flight per client, as a fleet's bursts of reports need."""
    with Mosquitto(tmp_path / "broker", extra_lines=["max_inflight_messages 1000"]) as started:
        yield started


@dataclass(frozen=True)
class Received:
    """One message a :class:`Subscriber` received."""

    topic: str
    payload: bytes
    retained: bool


def _auth_args(port: int, user: str | None, password: str | None, version: str) -> list[str]:
    args = ["-h", "127.0.0.1", "-p", str(port), "-V", "5" if version == "5" else "311"]
    if user is not None:
        args += ["-u", user]
    if password is not None:
        args += ["-P", password]
    return args


class Subscriber:
    """``mosquitto_sub`` subscribed to ``topics`` (QoS 1), collecting messages in a thread.

    Args:
        port: the broker's port on 127.0.0.1.
        topics: topic filters to subscribe to.
        client_id: the client id (with ``persistent=True`` the session outlives the process).
        user, password: credentials, when the broker demands them.
        version: "5" or "3.1.1".
        persistent: keep the session (``-c``) so messages queue while it is stopped.
    """

    def __init__(self, port: int, topics: Sequence[str], *, client_id: str, user: str | None = None,
                 password: str | None = None, version: str = "5", persistent: bool = False) -> None:
        # mosquitto_sub block-buffers a pipe: ask coreutils' stdbuf for line buffering
        line_buffered = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []
        args = [*line_buffered, "mosquitto_sub", *_auth_args(port, user, password, version),
                "-i", client_id, "-q", "1", "-d", "-F", "MSG\t%r\t%t\t%x"]
        if persistent:
            args.append("-c")
        for t in topics:
            args += ["-t", t]
        self._cond = threading.Condition()
        self.received: list[Received] = []
        self.granted: list[int] = []
        self.lines: list[str] = []
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._cond:
                self.lines.append(line)
                self._parse(line)
                self._cond.notify_all()

    def _parse(self, line: str) -> None:
        """Record a message or a subscription answer; a line cut short (the client was stopped while
        writing it) is kept in ``lines`` only."""
        if line.startswith("MSG\t"):
            fields = line.split("\t", 3)
            if len(fields) == 4:
                try:
                    payload = bytes.fromhex(fields[3])
                except ValueError:
                    return
                self.received.append(Received(fields[2], payload, fields[1] == "1"))
        elif line.startswith("Subscribed (mid:"):
            parts = line.split(":", 2)
            if len(parts) == 3:
                self.granted += [int(x) for x in parts[2].replace(",", " ").split() if x.isdigit()]

    def wait(self, predicate: Callable[[Subscriber], bool], timeout: float = 10.0) -> bool:
        """Wait (bounded) until ``predicate(self)`` holds; return whether it did."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self._proc.poll() is not None and not self._thread.is_alive()):
                    return predicate(self)
                self._cond.wait(min(remaining, 0.1))
            return True

    def wait_subscribed(self, count: int, timeout: float = 10.0) -> list[int]:
        """Wait until ``count`` subscriptions were answered; return the granted codes (QoS or error).

        Raises:
            RuntimeError: no answer in time (the client's output is in the message).
        """
        if not self.wait(lambda s: len(s.granted) >= count, timeout):
            raise RuntimeError(f"mosquitto_sub was not subscribed in time: {self.lines[-10:]}")
        return list(self.granted)

    def messages(self, topic: str | None = None) -> list[Received]:
        """Return a copy of what was received (on ``topic`` only, when given)."""
        with self._cond:
            return [r for r in self.received if topic is None or r.topic == topic]

    def stop(self) -> None:
        """Stop the client by pid (SIGTERM, then SIGKILL) and wait for its reader."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=_STOP_WAIT)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=_STOP_WAIT)
        self._thread.join(timeout=_STOP_WAIT)
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def publish(port: int, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
            user: str | None = None, password: str | None = None, version: str = "5",
            client_id: str | None = None) -> subprocess.CompletedProcess[str]:
    """Publish one message with ``mosquitto_pub`` (bounded to 10 s); return the finished process."""
    args = ["mosquitto_pub", *_auth_args(port, user, password, version), "-t", topic, "-q", str(qos),
            "-s", "-d"]
    if retain:
        args.append("-r")
    if client_id is not None:
        args += ["-i", client_id]
    return subprocess.run(args, input=payload.decode("utf-8"), capture_output=True, text=True,
                          timeout=10, check=False)
