"""Run the health checks of a release, each bounded by its own timeout.

A check never raises: whatever goes wrong (a timeout, a refused connection, a command that is not
there) becomes a failed :class:`CheckResult` with a one-line ``detail``. Commands and
``systemctl`` go through :class:`edge_agent.runner.Runner` (which kills the process group on
timeout); a ``command`` check runs exactly like a ``command`` resource: working directory the
device root, the clean environment of :func:`edge_agent.runner.release_environment` plus its
``env:``; network and metric checks (disk, memory, temperature) run in a worker thread that is
abandoned when its time is up (their sockets carry the same timeout, so the thread ends soon after).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_agent import telemetry
from edge_agent.runner import CommandEnv, Runner
from edge_core.errors import EdgeFleetError
from edge_core.resources import (
    CommandCheck,
    DiskFreeCheck,
    HealthCheck,
    HttpCheck,
    MemoryCheck,
    SystemdActiveCheck,
    TcpCheck,
    TemperatureCheck,
)

__all__ = ["CheckResult", "failed_checks", "run_check", "run_checks"]

log = logging.getLogger(__name__)

_DETAIL_MAX = 200


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one health check of one bundle."""

    bundle: str
    name: str
    kind: str
    ok: bool
    detail: str
    duration: float


def run_checks(checks: Sequence[tuple[str, HealthCheck]], runner: Runner, fs_root: Path,
               who: CommandEnv | None = None) -> list[CheckResult]:
    """Run every ``(bundle, check)`` in order and return one result each (never raises).

    ``fs_root`` is the directory that stands for ``/`` on this device; ``disk_free`` paths are
    device paths resolved under it, and ``command`` checks run in it. ``who`` names the device and
    release for their ``EDGE_FLEET_*`` variables.
    """
    return [run_check(bundle, check, runner, fs_root, who) for bundle, check in checks]


def failed_checks(results: Sequence[CheckResult]) -> list[CheckResult]:
    """Return the results that are not ok, in order."""
    return [r for r in results if not r.ok]


def run_check(bundle: str, check: HealthCheck, runner: Runner, fs_root: Path,
              who: CommandEnv | None = None) -> CheckResult:
    """Run one check of ``bundle`` within ``check.timeout`` seconds and return its result."""
    start = time.monotonic()
    try:
        ok, detail = _dispatch(check, runner, fs_root, who or CommandEnv())
    except (EdgeFleetError, OSError, ValueError) as exc:
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    duration = time.monotonic() - start
    detail = _one_line(detail)
    if not ok:
        log.info("health check %s/%s failed: %s", bundle, check.name, detail)
    return CheckResult(bundle=bundle, name=check.name, kind=check.kind, ok=ok, detail=detail,
                       duration=round(duration, 3))


def _dispatch(check: HealthCheck, runner: Runner, fs_root: Path, who: CommandEnv) -> tuple[bool, str]:
    if isinstance(check, CommandCheck):
        return _command(check, runner, fs_root, who)
    if isinstance(check, SystemdActiveCheck):
        return _systemd_active(check, runner)
    if isinstance(check, TcpCheck):
        return _bounded(lambda: _tcp(check), check.timeout)
    if isinstance(check, HttpCheck):
        from edge_agent.engine.http_check import http_get_status  # noqa: PLC0415 - urllib+ssl cost ~8 MB

        return _bounded(lambda: http_get_status(check), check.timeout)
    if isinstance(check, DiskFreeCheck):
        return _bounded(lambda: _disk_free(check, fs_root), check.timeout)
    if isinstance(check, MemoryCheck):
        return _bounded(lambda: _memory(check), check.timeout)
    if isinstance(check, TemperatureCheck):
        return _bounded(lambda: _temperature(check), check.timeout)
    return False, f"unknown health check kind {check.kind!r}"


def _command(check: CommandCheck, runner: Runner, fs_root: Path, who: CommandEnv) -> tuple[bool, str]:
    result = runner.run_release_command(check.run, timeout=check.timeout, root=fs_root, who=who,
                                        env=check.env)
    if result.timed_out:
        return False, f"timed out after {check.timeout:g}s"
    if result.returncode != 0:
        tail = (result.stderr.strip() or result.stdout.strip()).splitlines()
        return False, f"exit status {result.returncode}" + (f": {tail[-1]}" if tail else "")
    return True, "exit status 0"


def _systemd_active(check: SystemdActiveCheck, runner: Runner) -> tuple[bool, str]:
    result = runner.run(["systemctl", "is-active", "--quiet", "--", check.unit], timeout=check.timeout)
    if result.timed_out:
        return False, f"systemctl timed out after {check.timeout:g}s"
    if result.returncode != 0:
        return False, f"{check.unit} is not active (systemctl exit status {result.returncode})"
    return True, f"{check.unit} is active"


def _tcp(check: TcpCheck) -> tuple[bool, str]:
    try:
        with socket.create_connection((check.host, check.port), timeout=check.timeout):
            pass
    except OSError as exc:
        return False, f"connect to {check.host}:{check.port} failed: {exc}"
    return True, f"connected to {check.host}:{check.port}"


def _disk_free(check: DiskFreeCheck, fs_root: Path) -> tuple[bool, str]:
    host_path = fs_root / check.path.lstrip("/")
    _total, _free, pct = telemetry.disk_usage(host_path)
    detail = f"{check.path}: {pct:.1f}% free (minimum {check.min_free_percent:g}%)"
    return pct >= check.min_free_percent, detail


def _memory(check: MemoryCheck) -> tuple[bool, str]:
    used = telemetry.memory_percent()
    return used <= check.max_used_percent, f"memory {used:.1f}% used (maximum {check.max_used_percent:g}%)"


def _temperature(check: TemperatureCheck) -> tuple[bool, str]:
    temps = telemetry.temperatures()
    if not temps:
        return True, "no temperature sensor"
    hottest_name, hottest = max(temps.items(), key=lambda kv: kv[1])
    return hottest <= check.max_celsius, f"{hottest_name} at {hottest:.1f}C (maximum {check.max_celsius:g}C)"


def _bounded(fn: Callable[[], tuple[bool, str]], timeout: float) -> tuple[bool, str]:
    """Run ``fn`` in a daemon thread; a failure to finish within ``timeout`` fails the check."""
    box: list[tuple[bool, str]] = []

    def work() -> None:
        try:
            box.append(fn())
        except Exception as exc:  # noqa: BLE001 - a check reports, it never raises
            box.append((False, f"{type(exc).__name__}: {exc}"))

    worker = threading.Thread(target=work, name="health-check", daemon=True)
    worker.start()
    worker.join(timeout + 0.05)
    if not box:
        return False, f"timed out after {timeout:g}s"
    return box[0]


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _DETAIL_MAX else line[: _DETAIL_MAX - 1] + "…"
