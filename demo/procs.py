"""Processes for the demo: narration, one-shot commands, and long-running children stopped by pid.

Every long-running process the demo starts goes through :class:`Children`, which starts it in a
session of its own (so Ctrl-C in the terminal reaches only the demo, which then stops them in
order) and stops each one by its pid: SIGTERM to a batch, a bounded wait, SIGKILL for stragglers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BIN", "GIT_ENV", "Children", "DemoError", "free_port", "run_tool", "say", "wait_for_port",
           "wait_until"]

BIN = Path(sys.executable).parent
GIT_ENV = {
    "GIT_AUTHOR_NAME": "Demo Operator", "GIT_AUTHOR_EMAIL": "operator@example.invalid",
    "GIT_COMMITTER_NAME": "Demo Operator", "GIT_COMMITTER_EMAIL": "operator@example.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
}
_TOOL_TIMEOUT_S = 120.0
_STOP_WAIT_S = 15.0


class DemoError(Exception):
    """A step of the demo failed; the message says which and why (printed as one line)."""


def say(text: str) -> None:
    """Print one narration line at once."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def run_tool(argv: Sequence[str | Path], *, cwd: Path | None = None, env: Mapping[str, str] | None = None,
             check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run one command to completion (at most 120 s), capturing its output.

    Raises:
        DemoError: it exited non-zero while ``check`` is set, or did not finish in time.
    """
    full_env = {**os.environ, **GIT_ENV, **(env or {})}
    words = [str(a) for a in argv]
    try:
        proc = subprocess.run(words, cwd=cwd, env=full_env, input=stdin, text=True, capture_output=True,
                              check=False, timeout=_TOOL_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise DemoError(f"{' '.join(words[:3])} did not finish in {_TOOL_TIMEOUT_S:g} s") from exc
    if check and proc.returncode != 0:
        reason = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or [f"exit {proc.returncode}"]
        raise DemoError(f"{' '.join(Path(w).name if i == 0 else w for i, w in enumerate(words[:3]))} "
                        f"failed: {reason[0]}")
    return proc


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(cond: Callable[[], bool], what: str, timeout: float, interval: float = 0.2) -> float:
    """Poll ``cond`` until it holds; return the seconds it took.

    Raises:
        DemoError: it did not hold within ``timeout`` seconds.
    """
    start = time.monotonic()
    while True:
        if cond():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise DemoError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def wait_for_port(port: int, what: str, timeout: float = 15.0,
                  alive: Callable[[], bool] | None = None) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port``.

    Raises:
        DemoError: nothing listened in time, or ``alive`` says the process exited.
    """
    def listening() -> bool:
        if alive is not None and not alive():
            raise DemoError(f"{what} exited at start")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
        return False

    wait_until(listening, f"{what} to listen on port {port}", timeout, interval=0.05)


@dataclass
class _Child:
    name: str
    kind: str
    proc: subprocess.Popen[bytes]
    log: Path


class Children:
    """The long-running processes of the demo; :meth:`stop_all` stops every one of them by pid."""

    def __init__(self) -> None:
        self._children: list[_Child] = []

    def start(self, name: str, kind: str, argv: Sequence[str | Path], log: Path, *,
              env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` with stdout and stderr going to ``log``; ``kind`` groups processes that are
        stopped together (in the reverse order of their kinds' first start).

        Raises:
            DemoError: the program cannot be started.
        """
        full_env = {**os.environ, **(env or {})}
        try:
            with log.open("wb") as out:
                proc = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
        except OSError as exc:
            raise DemoError(f"cannot start {name}: {exc}") from exc
        self._children.append(_Child(name, kind, proc, log))
        return proc

    def pids(self) -> list[int]:
        """Return the pids of the children still running."""
        return [c.proc.pid for c in self._children if c.proc.poll() is None]

    def exited(self) -> list[str]:
        """Return the names (and exit codes) of children that already ended."""
        return [f"{c.name} (exit {c.proc.returncode}, log {c.log})" for c in self._children
                if c.proc.poll() is not None]

    def stop(self, name: str) -> None:
        """Stop the children called ``name`` by pid (SIGTERM, bounded wait, SIGKILL); forget them."""
        batch = [c for c in self._children if c.name == name]
        self._stop_batch(batch)
        self._children = [c for c in self._children if c.name != name]

    @staticmethod
    def _stop_batch(batch: Sequence[_Child]) -> None:
        for c in batch:
            if c.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(c.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_WAIT_S
        for c in batch:
            try:
                c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(c.proc.pid, signal.SIGKILL)
                c.proc.wait(timeout=5)

    def stop_all(self) -> None:
        """Stop every child by pid, kind by kind, newest kind first: SIGTERM the kind's processes,
        wait (bounded) for them, SIGKILL whatever is left. Safe to call more than once."""
        kinds: list[str] = []
        for child in self._children:
            if child.kind not in kinds:
                kinds.append(child.kind)
        for kind in reversed(kinds):
            self._stop_batch([c for c in self._children if c.kind == kind])
        self._children.clear()
