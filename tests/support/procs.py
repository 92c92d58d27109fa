"""Helpers of the reliability tests: processes found and stopped by pid, and the small statistics
the tests print (per-second histograms, spreads).
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from tests.support.wait import wait_until

__all__ = [
    "Proc",
    "kill_pids",
    "per_second",
    "pids_with_arg",
    "render_histogram",
    "spread",
]


def _alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text.rsplit(")", 1)[-1].split()[0] != "Z"


def pids_with_arg(marker: str) -> list[int]:
    """Return the live processes (not this one) whose command line contains ``marker``.

    The tests pass a path inside their own tmp directory, so only processes they started match.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def kill_pids(pids: Iterable[int], timeout: float = 5.0) -> None:
    """SIGKILL each pid and wait (bounded) until none is alive any more.

    Raises:
        AssertionError: a process outlived ``timeout``.
    """
    pids = list(pids)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not any(_alive(p) for p in pids), f"processes {pids} to die", timeout, 0.005)


def per_second(times: Sequence[float], origin: float) -> list[int]:
    """Count ``times`` per whole second after ``origin``: element i is how many fell in [i, i+1)."""
    if not times:
        return []
    bins = Counter(int(max(0.0, t - origin)) for t in times)
    return [bins.get(i, 0) for i in range(max(bins) + 1)]


def render_histogram(counts: Sequence[int], *, label: str = "s", width: int = 50) -> str:
    """Return a text bar chart of ``counts`` (one line per bin, bars scaled to ``width``)."""
    top = max(counts, default=0) or 1
    return "\n".join(f"{i:>4}{label} {n:>5} {'#' * max(1 if n else 0, round(n * width / top))}"
                     for i, n in enumerate(counts))


def spread(values: Sequence[float]) -> dict[str, float]:
    """Return min, median, max and the coefficient of variation of ``values`` (at least two)."""
    mean = statistics.fmean(values)
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "cv": statistics.pstdev(values) / mean if mean else 0.0}


class Proc:
    """A child process with its output in a log file, stopped by its pid (SIGTERM, then SIGKILL)."""

    def __init__(self, argv: Sequence[str | Path], log: Path, *, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._fh = log.open("wb")
        self.p = subprocess.Popen([str(a) for a in argv], stdout=self._fh, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, env=env)

    @property
    def pid(self) -> int:
        """The process id."""
        return self.p.pid

    def wait(self, timeout: float) -> int:
        """Wait (bounded) for the process to exit; return its exit status."""
        return self.p.wait(timeout=timeout)

    def stop(self, grace: float = 10.0) -> int:
        """SIGTERM by pid, SIGKILL after ``grace`` seconds; idempotent; return the exit status."""
        if self.p.poll() is None:
            os.kill(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.kill(self.p.pid, signal.SIGKILL)
                self.p.wait(timeout=5)
        if not self._fh.closed:
            self._fh.close()
        return self.p.returncode
