"""Device metrics from psutil: the only module of the agent that imports psutil.

Health checks read disk, memory and temperature through the three small functions here; the
reporting module publishes :func:`sample` periodically. psutil's own exceptions are translated
into :class:`OSError` at this boundary (psutil raises subclasses of it for missing paths).

psutil is imported on first use: it costs a one-shot ``edge-agent sync`` about 10 ms of start-up,
and a sync whose bundles have no disk, memory or temperature check never needs it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psutil

__all__ = ["disk_usage", "memory_percent", "sample", "temperatures"]

log = logging.getLogger(__name__)

_own: psutil.Process | None = None  # this process, kept so its CPU share is measured between samples


def _psutil() -> ModuleType:
    import psutil  # noqa: PLC0415 - deferred, see the module docstring

    return psutil


def _this_process() -> psutil.Process:
    """This process as one psutil object for its lifetime (per-process CPU counters live on it)."""
    global _own  # noqa: PLW0603 - one per process
    if _own is None or _own.pid != os.getpid():
        _own = _psutil().Process()
    return _own


def disk_usage(path: str | Path) -> tuple[int, int, float]:
    """Return ``(total bytes, free bytes, percent free)`` of the filesystem holding ``path``.

    Raises:
        OSError: the path does not exist or cannot be examined.
    """
    usage = _psutil().disk_usage(str(path))
    percent_free = 100.0 * usage.free / usage.total if usage.total else 0.0
    return int(usage.total), int(usage.free), percent_free


def memory_percent() -> float:
    """Return the share of physical memory in use, in percent (0-100)."""
    return float(_psutil().virtual_memory().percent)


def temperatures() -> dict[str, float]:
    """Return every temperature sensor reading in Celsius, keyed ``"<chip>/<label or index>"``.

    The mapping is empty when the device has no sensor or the platform does not expose any.
    """
    read = getattr(_psutil(), "sensors_temperatures", None)
    if read is None:
        return {}
    try:
        chips = read()
    except (OSError, RuntimeError) as exc:
        log.debug("temperature sensors unreadable: %s", exc)
        return {}
    out: dict[str, float] = {}
    for chip, entries in chips.items():
        for i, entry in enumerate(entries):
            label = entry.label or str(i)
            out[f"{chip}/{label}"] = float(entry.current)
    return out


def sample(mounts: Sequence[str | Path] = ("/",)) -> dict[str, Any]:
    """Return one JSON-able snapshot of the device and of this process.

    Keys: ``cpu_percent`` (since the previous call; 0.0 on the first), ``load`` (1, 5, 15 minute
    averages), ``memory_percent``, ``disk`` (per mount: total, free, percent_free; mounts that
    cannot be read are left out), ``temperatures``, ``uptime`` (seconds since boot),
    ``process`` (``rss`` bytes, ``cpu_percent`` of this process since its previous sample).
    """
    disks: dict[str, dict[str, float]] = {}
    for mount in mounts:
        try:
            total, free, pct = disk_usage(mount)
        except OSError as exc:
            log.debug("disk usage of %s unreadable: %s", mount, exc)
            continue
        disks[str(mount)] = {"total": total, "free": free, "percent_free": round(pct, 2)}
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    proc = _this_process()
    with proc.oneshot():
        rss = int(proc.memory_info().rss)
        proc_cpu = float(proc.cpu_percent(interval=None))
    return {
        "cpu_percent": float(_psutil().cpu_percent(interval=None)),
        "load": load,
        "memory_percent": memory_percent(),
        "disk": disks,
        "temperatures": temperatures(),
        "uptime": round(max(0.0, time.time() - _psutil().boot_time()), 1),
        "process": {"rss": rss, "cpu_percent": proc_cpu},
    }
