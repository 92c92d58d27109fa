"""Run external commands with a timeout that kills the whole process group, and capped output.

Every process the agent starts (``systemctl``, ``sysctl``, command resources, health checks) goes
through :class:`Runner`. A command given as a string runs through ``/bin/sh -c``; a sequence runs
as an argv list. Each command starts in a new session so that on timeout its whole process group
(including background children) is killed. Output goes to anonymous temporary files rather than
pipes, so a background child that keeps the descriptors open cannot hang the agent; each stream is
capped at :data:`OUTPUT_CAP` bytes and decoded as UTF-8 with replacement.

Two kinds of process, two environments. The agent's own tools (``systemctl``, ``sysctl``) run with
the agent's environment (:meth:`Runner.run`). Code of the release (``command`` resources and their
guards, ``command`` health checks) runs through :meth:`Runner.run_release_command`: working
directory the device root, and a clean environment built here and nowhere else
(:func:`release_environment`): ``PATH`` (:data:`SAFE_PATH`), ``LANG=C.UTF-8``,
``EDGE_FLEET_ROOT``, ``EDGE_FLEET_DEVICE``, ``EDGE_FLEET_RELEASE`` and ``EDGE_FLEET_COMMIT`` (when
known), then the command's own ``env:`` mapping. Nothing else of the agent's environment reaches it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from edge_agent.errors import ApplyError

__all__ = ["OUTPUT_CAP", "SAFE_PATH", "CommandEnv", "RunResult", "Runner", "release_environment"]

log = logging.getLogger(__name__)

OUTPUT_CAP = 64 * 1024
"""Bytes kept of each of stdout and stderr."""

_KILL_GRACE = 2.0

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""The ``PATH`` of every command of a release (an ``env:`` mapping may set another)."""


@dataclass(frozen=True)
class CommandEnv:
    """The device and release a command of the release runs for (empty: not known here)."""

    device: str = ""
    release: int | None = None
    commit: str | None = None


def release_environment(root: Path, who: CommandEnv, extra: Iterable[tuple[str, str]] = ()) -> dict[str, str]:
    """Return the whole environment of a command of the release on the device rooted at ``root``.

    ``extra`` is the command's validated ``env:`` mapping (it cannot set ``EDGE_FLEET_*``).
    """
    env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "EDGE_FLEET_ROOT": str(root),
           "EDGE_FLEET_DEVICE": who.device}
    if who.release is not None:
        env["EDGE_FLEET_RELEASE"] = str(who.release)
    if who.commit is not None:
        env["EDGE_FLEET_COMMIT"] = who.commit
    for name, value in extra:
        if not name.startswith("EDGE_FLEET_"):
            env[name] = value
    return env


@dataclass(frozen=True)
class RunResult:
    """The outcome of one command.

    Attributes:
        returncode: the exit status (negative signal number when killed; -9 after a timeout).
        stdout: the first :data:`OUTPUT_CAP` bytes of standard output, decoded.
        stderr: the first :data:`OUTPUT_CAP` bytes of standard error, decoded.
        timed_out: the command ran past its timeout and its process group was killed.
    """

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        """True when the command exited 0 within its timeout."""
        return self.returncode == 0 and not self.timed_out

    def last_error_line(self, limit: int = 200) -> str:
        """Return the last non-empty line of stderr (else stdout), cut to ``limit`` characters."""
        for text in (self.stderr, self.stdout):
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            if lines:
                return lines[-1][:limit]
        return ""


class Runner:
    """Starts processes for the drivers and health checks; holds no state."""

    def run(self, cmd: Sequence[str] | str, *, timeout: float, env: Mapping[str, str] | None = None,
            cwd: Path | None = None) -> RunResult:
        """Run one of the agent's own tools and wait for it at most ``timeout`` seconds.

        Args:
            cmd: an argv list, or a string run through ``/bin/sh -c``.
            timeout: seconds before the whole process group is killed.
            env: variables added to (overriding) the agent's own environment.
            cwd: working directory.

        Raises:
            ApplyError: the command cannot be started (not found, not executable, bad cwd).
        """
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        return self._spawn(cmd, timeout, full_env, cwd)

    def run_release_command(self, cmd: Sequence[str] | str, *, timeout: float, root: Path, who: CommandEnv,
                            env: Iterable[tuple[str, str]] = ()) -> RunResult:
        """Run a command of the release: in ``root``, with only :func:`release_environment`.

        Raises:
            ApplyError: the command cannot be started (not found on :data:`SAFE_PATH`, not executable).
        """
        return self._spawn(cmd, timeout, release_environment(root, who, env), root)

    def _spawn(self, cmd: Sequence[str] | str, timeout: float, full_env: Mapping[str, str],
               cwd: Path | None) -> RunResult:
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        if not argv:
            raise ApplyError("cannot run an empty command")
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        env=full_env, cwd=cwd, start_new_session=True)
            except OSError as exc:
                raise ApplyError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
            timed_out = False
            try:
                returncode = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                log.warning("command %s timed out after %ss; killing its process group", argv[0], timeout)
                _signal_group(proc.pid)
                returncode = proc.wait(timeout=_KILL_GRACE * 5)
                _wait_group_gone(proc.pid)
            return RunResult(returncode, _read_capped(out), _read_capped(err), timed_out)

    @staticmethod
    def which(name: str) -> str | None:
        """Return the full path of executable ``name`` on PATH, or ``None``."""
        return shutil.which(name)


def _signal_group(pgid: int) -> None:
    """SIGKILL every process of group ``pgid``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _wait_group_gone(pgid: int) -> None:
    """Wait (bounded) until no live process of group ``pgid`` is left (zombies count as gone)."""
    deadline = time.monotonic() + _KILL_GRACE
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.01)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


def _read_capped(stream: IO[bytes]) -> str:
    stream.seek(0)
    return stream.read(OUTPUT_CAP).decode("utf-8", errors="replace")
